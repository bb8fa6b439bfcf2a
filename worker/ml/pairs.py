"""Same/different feedback pairs in the compact tensor form training and evaluation use.

The pair file itself is read and written by :mod:`worker.ml.pair_file` (torch-free, shared with
``magtune import``); its names are re-exported here for the callers that index what they read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from worker.ml.pair_file import (
    LabeledPair,
    PairFileError,
    PairReadResult,
    RowProblem,
    read_pairs,
    write_pairs,
)
from worker.ml.preprocessing import ImageCache

__all__ = [
    "IndexedPairs",
    "LabeledPair",
    "PairFileError",
    "PairReadResult",
    "RowProblem",
    "index_pairs",
    "read_pairs",
    "write_pairs",
]


@dataclass
class IndexedPairs:
    """Pairs as indices into one stack of distinct images, so each image is stored and embedded once."""

    pixels: torch.Tensor  # uint8 [N, 3, H, W], RGB
    first: torch.Tensor  # int64 [P], index into pixels
    second: torch.Tensor  # int64 [P]
    labels: torch.Tensor  # float32 [P], 1.0 same / 0.0 different
    names: list[str]  # [N], what each image is (its path, or a face id)

    def __post_init__(self) -> None:
        n = self.pixels.shape[0]
        if self.pixels.dtype != torch.uint8 or self.pixels.ndim != 4 or self.pixels.shape[1] != 3:
            raise ValueError(
                f"pixels must be uint8 [N, 3, H, W], got {self.pixels.dtype} {list(self.pixels.shape)}"
            )
        if len(self.names) != n:
            raise ValueError(f"{len(self.names)} names for {n} images")
        p = self.labels.shape[0]
        for name, index in (("first", self.first), ("second", self.second)):
            if index.dtype != torch.int64 or index.shape != (p,):
                raise ValueError(f"{name} must be int64 [{p}], got {index.dtype} {list(index.shape)}")
            if p and (int(index.min()) < 0 or int(index.max()) >= n):
                raise ValueError(f"{name} holds an index outside 0..{n - 1}")
        if self.labels.dtype != torch.float32 or self.labels.ndim != 1:
            raise ValueError(f"labels must be float32 [P], got {self.labels.dtype} {list(self.labels.shape)}")
        if p and not bool(((self.labels == 0) | (self.labels == 1)).all()):
            raise ValueError("labels must be 0 or 1")

    @classmethod
    def from_arrays(
        cls,
        pixels: torch.Tensor | np.ndarray,
        first: Sequence[int] | np.ndarray | torch.Tensor,
        second: Sequence[int] | np.ndarray | torch.Tensor,
        labels: Sequence[int | float] | np.ndarray | torch.Tensor,
        names: Sequence[str],
    ) -> IndexedPairs:
        """Build from pixels already decoded elsewhere (e.g. faces read from the blob store)."""
        return cls(
            pixels=torch.as_tensor(pixels),
            first=torch.as_tensor(np.asarray(first), dtype=torch.int64).reshape(-1),
            second=torch.as_tensor(np.asarray(second), dtype=torch.int64).reshape(-1),
            labels=torch.as_tensor(np.asarray(labels), dtype=torch.float32).reshape(-1),
            names=[str(n) for n in names],
        )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_count(self) -> int:
        return int(self.pixels.shape[0])


def index_pairs(pairs: Sequence[LabeledPair], cache: ImageCache) -> IndexedPairs:
    """Decode (through ``cache``) each distinct image once and describe the pairs as indices into them."""
    index: dict[Path, int] = {}
    first: list[int] = []
    second: list[int] = []
    for pair in pairs:
        for image, out in ((pair.image1, first), (pair.image2, second)):
            key = Path(image).resolve()
            if key not in index:
                index[key] = len(index)
            out.append(index[key])
    if index:
        pixels = torch.stack([cache.get(image) for image in index])
    else:
        pixels = torch.empty((0, 3, cache.size, cache.size), dtype=torch.uint8)
    return IndexedPairs.from_arrays(
        pixels=pixels,
        first=np.asarray(first, dtype=np.int64),
        second=np.asarray(second, dtype=np.int64),
        labels=np.asarray([p.label for p in pairs], dtype=np.float32),
        names=[str(image) for image in index],
    )
