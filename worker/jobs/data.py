"""Feedback and face images as the jobs see them: which pairs a job may train, select and judge on.

Every feedback pair carries a split: `train`, `val` or `test` when both of its faces hash into that split,
`regression` when it was posted for the regression set, anything else (pairs across splits) is unused. The
regression set's faces are never trained on, whatever other pairs name them: a train pair naming a regression
face is dropped. Val and test pairs naming one are dropped as well, so model selection, the reported test
figures and the regression check are three independent sets of faces.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import domain
from app.blobs import BlobStore
from app.splits import SPLIT_NAMES
from app.tables import Face, FeedbackPair
from worker.ml.pairs import IndexedPairs
from worker.ml.preprocessing import ImageDecodeError, decode_image
from worker.runtime import JobFailed

REGRESSION: str = domain.FeedbackSplit.REGRESSION.value
PAIR_SETS: tuple[str, ...] = tuple(split.value for split in domain.PAIR_SETS)


@dataclass(frozen=True)
class FeedbackRow:
    id: uuid.UUID
    face_a: uuid.UUID
    face_b: uuid.UUID
    label: int


@dataclass
class FeedbackSets:
    """Usable pairs per set (train, val, test, regression) and what was left out and why."""

    pairs: dict[str, list[FeedbackRow]]
    regression_faces: frozenset[uuid.UUID]
    excluded: dict[str, int] = field(default_factory=dict)  # pairs dropped for naming a regression face
    unused: int = 0  # pairs in no set (their faces are in different splits)

    def faces(self, *names: str) -> set[uuid.UUID]:
        return {face for name in names for row in self.pairs[name] for face in (row.face_a, row.face_b)}

    def snapshot(self, *names: str) -> dict[str, Any]:
        """What a model was made from: a hash of the exact feedback (ids and labels) and its counts."""
        names = names or PAIR_SETS
        used = sorted(f"{row.id}:{row.label}" for name in names for row in self.pairs[name])
        return {
            "feedback_ids_sha256": hashlib.sha256("\n".join(used).encode()).hexdigest(),
            "pairs": {name: label_counts(self.pairs[name]) for name in names},
            "faces": {name: len(self.faces(name)) for name in names},
            "excluded_for_regression_faces": {name: self.excluded.get(name, 0) for name in names},
            "unused_pairs": self.unused,
        }


def label_counts(rows: Sequence[FeedbackRow]) -> dict[str, int]:
    same = sum(row.label for row in rows)
    return {"total": len(rows), "same": same, "different": len(rows) - same}


def has_both_labels(rows: Sequence[FeedbackRow]) -> bool:
    counts = label_counts(rows)
    return counts["same"] > 0 and counts["different"] > 0


def pairs_sha256(rows: Iterable[FeedbackRow]) -> str:
    """Names a pair set by its content (faces and labels), so two evaluations on the same pairs match."""
    lines = sorted(f"{row.face_a}:{row.face_b}:{row.label}" for row in rows)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def load_feedback(session: Session) -> FeedbackSets:
    rows = session.execute(
        select(
            FeedbackPair.id, FeedbackPair.face_a, FeedbackPair.face_b, FeedbackPair.label, FeedbackPair.split
        )
    ).all()
    by_split: dict[str, list[FeedbackRow]] = {name: [] for name in PAIR_SETS}
    unused = 0
    for row in rows:
        if row.split in by_split:
            by_split[row.split].append(FeedbackRow(row.id, row.face_a, row.face_b, int(row.label)))
        else:
            unused += 1
    regression_faces = frozenset(face for row in by_split[REGRESSION] for face in (row.face_a, row.face_b))
    pairs = {REGRESSION: by_split[REGRESSION]}
    excluded: dict[str, int] = {}
    for name in SPLIT_NAMES:
        kept = [
            r for r in by_split[name] if r.face_a not in regression_faces and r.face_b not in regression_faces
        ]
        pairs[name] = kept
        excluded[name] = len(by_split[name]) - len(kept)
    return FeedbackSets(pairs=pairs, regression_faces=regression_faces, excluded=excluded, unused=unused)


def face_digests(session: Session) -> dict[uuid.UUID, str]:
    """Every face's content hash (one query, no giant IN list), to find its image in the blob store."""
    return {face_id: sha256 for face_id, sha256 in session.execute(select(Face.id, Face.sha256))}


def decode_faces(
    store: BlobStore, digests: Mapping[uuid.UUID, str], face_ids: Iterable[uuid.UUID], *, size: int
) -> dict[uuid.UUID, torch.Tensor]:
    """Each named face decoded once; JobFailed ("bad-data") naming the faces that cannot be read.

    Training on a silently shrunken set would be worse than stopping: the api checked every image on upload,
    so a face that cannot be read now means the store lost or damaged it, which an operator must see.
    """
    pixels: dict[uuid.UUID, torch.Tensor] = {}
    problems: list[str] = []
    for face in dict.fromkeys(face_ids):
        digest = digests.get(face)
        if digest is None:
            problems.append(f"face {face} was deleted")
            continue
        try:
            pixels[face] = decode_face(store, face, digest, size)
        except (OSError, ImageDecodeError) as exc:
            problems.append(str(exc))
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise JobFailed("bad-data", "Unreadable face images", "; ".join(problems[:3]) + more)
    return pixels


def decode_face(store: BlobStore, face_id: uuid.UUID, sha256: str, size: int) -> torch.Tensor:
    """A face's uint8 RGB pixels [3, size, size]; OSError when its blob is missing."""
    try:
        data = store.path("faces", sha256).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"face {face_id}: its image is missing from the blob store") from None
    return decode_image(data, name=f"face {face_id}", size=size).pixels


def indexed_pairs(rows: Sequence[FeedbackRow], pixels: Mapping[uuid.UUID, torch.Tensor]) -> IndexedPairs:
    """The pairs as indices into one stack of their distinct faces."""
    index: dict[uuid.UUID, int] = {}
    first: list[int] = []
    second: list[int] = []
    for row in rows:
        for face, out in ((row.face_a, first), (row.face_b, second)):
            out.append(index.setdefault(face, len(index)))
    if index:
        stack = torch.stack([pixels[face] for face in index])
    else:
        size = next(iter(pixels.values())).shape[-1] if pixels else 112
        stack = torch.empty((0, 3, size, size), dtype=torch.uint8)
    return IndexedPairs.from_arrays(
        pixels=stack,
        first=first,
        second=second,
        labels=[row.label for row in rows],
        names=[str(face) for face in index],
    )
