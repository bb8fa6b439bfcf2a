"""The order in which a training epoch visits its pairs.

BatchNorm stays frozen during fine-tuning, so an image's embedding does not depend on the batch it is in and a
training step only needs to forward each distinct image of its batch once. Feedback pairs share images heavily
(every photo of a person is paired with many others), so arranging each batch around a few images multiplies
the pairs a step scores per image it forwards. Every pair is still visited exactly once per epoch.
"""

import numpy as np
import torch
from torch import Tensor


def random_batches(pair_count: int, batch_size: int, rng: np.random.Generator) -> list[Tensor]:
    """Plain shuffled batches, as a per-pair data loader would draw them."""
    order = torch.from_numpy(rng.permutation(pair_count))
    return list(order.split(batch_size))


def image_grouped_batches(
    first: Tensor, second: Tensor, batch_size: int, rng: np.random.Generator
) -> list[Tensor]:
    """Shuffled batches built greedily so that each one names as few distinct images as it can.

    A batch starts from the next unused pair of a shuffled order, then repeatedly adds the image with the most
    unused pairs to the images already in the batch (ties: the one reached first in the shuffled order) and
    takes those pairs. On a dense pair set a batch grows into a near clique: 16 pairs among 6 to 8 images
    instead of up to 32. Where no pair extends the batch, the next unused pair starts a new group.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = rng.permutation(int(first.shape[0]))
    planner = _GroupedPlanner(first.numpy()[order], second.numpy()[order])
    return [torch.from_numpy(order[np.asarray(batch)]) for batch in planner.batches(batch_size)]


class _GroupedPlanner:
    """Greedy batch builder over pairs given in shuffled order (a pair is named by its rank in that order)."""

    scan_limit = 64  # unused pairs looked at per image when choosing the next one: bounds the cost of hubs

    def __init__(self, first: np.ndarray, second: np.ndarray) -> None:
        self.ends = np.stack([first, second], axis=1).tolist()
        self.links: dict[int, list[int]] = {}
        for rank, (a, b) in enumerate(self.ends):
            self.links.setdefault(a, []).append(rank)
            self.links.setdefault(b, []).append(rank)
        self.cursor = dict.fromkeys(self.links, 0)
        self.used = [False] * len(self.ends)
        self.next_unused = 0

    def batches(self, batch_size: int) -> list[list[int]]:
        remaining = len(self.ends)
        result = []
        while remaining:
            batch = self._one_batch(min(batch_size, remaining))
            remaining -= len(batch)
            result.append(batch)
        return result

    def _one_batch(self, size: int) -> list[int]:
        batch: list[int] = []
        members: set[int] = set()
        while len(batch) < size:
            image, ranks = self._best_extension(members)
            if image is None:
                ranks = [self._next_unused()]
                members.update(self.ends[ranks[0]])
            else:
                members.add(image)
            for rank in ranks[: size - len(batch)]:
                self.used[rank] = True
                batch.append(rank)
        return batch

    def _best_extension(self, members: set[int]) -> tuple[int | None, list[int]]:
        candidates: dict[int, list[int]] = {}
        for image in sorted(members):
            for rank in self._unused_links(image):
                a, b = self.ends[rank]
                other = b if a == image else a
                if other not in members:
                    candidates.setdefault(other, []).append(rank)
        if not candidates:
            return None, []
        best = max(candidates.items(), key=lambda item: (len(item[1]), -min(item[1])))
        return best[0], sorted(best[1])

    def _unused_links(self, image: int) -> list[int]:
        ranks, start = self.links[image], self.cursor[image]
        while start < len(ranks) and self.used[ranks[start]]:
            start += 1
        self.cursor[image] = start
        found = []
        for rank in ranks[start:]:
            if not self.used[rank]:
                found.append(rank)
                if len(found) == self.scan_limit:
                    break
        return found

    def _next_unused(self) -> int:
        while self.used[self.next_unused]:
            self.next_unused += 1
        return self.next_unused
