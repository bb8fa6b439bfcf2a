"""Split labelled pairs into train/val/test per image, from each image's content hash.

Why per image: a face that is trained on must never be scored in val or test, or the reported accuracy is a
training accuracy (the mistake the original report made). A pair whose images fall in different splits
belongs to none and is dropped (and counted). The split of an image depends only on its bytes, so it is the
same across jobs, pair orders and processes (see :mod:`app.splits`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from app.durable import file_digest
from app.splits import DEFAULT_SPLIT_FRACTIONS, SPLIT_NAMES, split_for_digest, validate_split_fractions
from worker.ml.pair_file import LabeledPair

__all__ = [
    "DEFAULT_SPLIT_FRACTIONS",
    "SPLIT_NAMES",
    "SplitResult",
    "file_digest",
    "split_for_digest",
    "split_pairs",
]


@dataclass
class SplitResult:
    splits: dict[str, list[LabeledPair]]  # every split name, possibly empty
    image_split: dict[Path, str]  # resolved image path → its split
    dropped_cross: int  # pairs whose two images fall in different splits
    image_counts: dict[str, int]  # distinct images per split

    @property
    def pair_counts(self) -> dict[str, int]:
        return {name: len(pairs) for name, pairs in self.splits.items()}


def split_pairs(
    pairs: Sequence[LabeledPair],
    fractions: Mapping[str, float] = DEFAULT_SPLIT_FRACTIONS,
    *,
    digests: Mapping[Path, str] | None = None,
) -> SplitResult:
    """Assign each image to a split by its content hash and keep the pairs whose images share a split.

    ``digests`` (resolved path → sha256 hex) spares re-hashing files whose hash is already known, such as
    faces in the blob store; any image missing from it is hashed once from its file.
    """
    shares = validate_split_fractions(fractions)
    known = dict(digests or {})
    image_split: dict[Path, str] = {}
    splits: dict[str, list[LabeledPair]] = {name: [] for name in SPLIT_NAMES}
    dropped = 0
    for pair in pairs:
        first = _split_of(Path(pair.image1).resolve(), shares, known, image_split)
        second = _split_of(Path(pair.image2).resolve(), shares, known, image_split)
        if first == second:
            splits[first].append(pair)
        else:
            dropped += 1
    image_counts = {name: 0 for name in SPLIT_NAMES}
    for name in image_split.values():
        image_counts[name] += 1
    return SplitResult(
        splits=splits, image_split=image_split, dropped_cross=dropped, image_counts=image_counts
    )


def _split_of(
    image: Path, shares: Mapping[str, float], digests: dict[Path, str], image_split: dict[Path, str]
) -> str:
    name = image_split.get(image)
    if name is None:
        digest = digests.get(image)
        if digest is None:
            digest = digests[image] = file_digest(image)
        name = image_split[image] = split_for_digest(digest, shares)
    return name
