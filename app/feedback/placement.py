"""Fewer labels across splits: a face without labels joins its partner's split when a pair is recorded.

A face's split starts where its content hash puts it (app.splits), and a pair counts only when both its faces
share a split, so with 70/15/15 a random pair lands in `cross` (wasted) 46% of the time. The rule, for every
source of feedback (single posts, batches, `magtune import`, review answers), applied item by item in order:

- a face that already has a label (any stored pair, or an earlier item of the same request) never moves, so
  no image is ever trained on in one split and evaluated in another;
- when a non-regression pair's faces are in different splits and exactly one of them has no label yet, that
  face moves into its partner's split before the pair is recorded, provided that split has room: its faces
  with labels stay within its configured fraction of all faces with labels, plus a margin of
  max(2, 2% of them). Otherwise the face keeps its split and the pair is `cross`. Without that cap, a
  densely paired set (every face paired with every other) would collapse into one split and leave
  evaluation without faces;
- when neither has a label yet, a fair coin drawn from the two face ids (random UUIDs, so independent of the
  splits) picks which face keeps its split; the other joins it if there is room, else the roles swap;
- when both have labels, the pair is stored as `cross` as before.

A face is one row, so a move keeps every image in exactly one split. Moves race with other requests that
record a first label for the same face, so a request that names a face without labels takes the placement
lock (`lock_placement`) and reads splits and labels again under it before deciding.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sqlalchemy import exists, func, select, text, union, update
from sqlalchemy.orm import Session

from app import tallies
from app.tables import Face, FeedbackPair

# A split takes a newcomer while its labelled faces stay within fraction * total + this margin.
MIN_MARGIN_FACES = 2
MARGIN_FRACTION = 0.02
# Any fixed 64-bit key: the transaction-scoped PostgreSQL advisory lock that serialises first labels.
_PLACEMENT_LOCK_KEY = 0x6D6167_7475_6E65


# One round trip for what every ingest needs to know about the faces it names: each face's split, and
# whether any stored pair already names it (two index probes per face: feedback's (face_a, face_b) key and
# its face_b index).
# The ids travel as a binary array (app/feedback/service.py says why).
PG_FACE_HAS_LABEL = (
    "EXISTS (SELECT 1 FROM feedback WHERE feedback.face_a = faces.id) "
    "OR EXISTS (SELECT 1 FROM feedback WHERE feedback.face_b = faces.id)"
)
_PG_FACE_STATES = (
    f"SELECT faces.id, faces.split, {PG_FACE_HAS_LABEL} "
    "FROM faces WHERE faces.id = ANY(CAST(%(ids)b AS uuid[]))"
)


def face_states(
    session: Session, face_ids: Iterable[uuid.UUID], chunk: int = 5000
) -> tuple[dict[int, str], set[int]]:
    """The split of every face that exists, and the faces some stored pair names (UUIDs as integers)."""
    ids = sorted(set(face_ids))
    if not ids:
        return {}, set()
    if session.get_bind().dialect.name == "postgresql":
        rows = session.connection().exec_driver_sql(_PG_FACE_STATES, {"ids": ids}).all()
        return {face.int: split for face, split, _ in rows}, {face.int for face, _, named in rows if named}
    splits: dict[int, str] = {}
    labelled: set[int] = set()
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        rows = session.execute(select(Face.id, Face.split).where(Face.id.in_(part)))
        splits.update((face.int, split) for face, split in rows)
        named = union(
            select(FeedbackPair.face_a).where(FeedbackPair.face_a.in_(part)),
            select(FeedbackPair.face_b).where(FeedbackPair.face_b.in_(part)),
        )
        labelled.update(face.int for face in session.scalars(named))
    return splits, labelled


def labelled_shares(session: Session, fractions: Mapping[str, float]) -> Shares:
    """How many faces with labels each split holds: the maintained tally (app/tallies.py), a few rows
    whatever the number of pairs. Read it under the placement lock, which all its writers hold.

    A pair of two labelled faces is recorded without the lock, so one that races the retraction of a face's
    last pair can leave that face uncounted until `tallies.recount_labelled_faces`. The tally only caps
    where newcomers go, with a margin, so such a drift shifts the cap by a face.
    """
    return Shares(tallies.by_split(session, tallies.LABELLED_FACES), fractions)


def count_first_labels(session: Session, faces: Iterable[int], splits: Mapping[int, str]) -> None:
    """Add faces that have just got their first label to their splits' tally (under the placement lock)."""
    tallies.add_by_split(session, tallies.LABELLED_FACES, Counter(splits[face] for face in faces))


def partners(session: Session, face_id: uuid.UUID) -> set[uuid.UUID]:
    """The faces some stored pair names together with `face_id`; none when it has no label."""
    named = union(
        select(FeedbackPair.face_b).where(FeedbackPair.face_a == face_id),
        select(FeedbackPair.face_a).where(FeedbackPair.face_b == face_id),
    )
    return set(session.scalars(named))


def forget_labels(
    session: Session, face_ids: Iterable[uuid.UUID], *, deleted_split: str | None = None, chunk: int = 5000
) -> None:
    """After pairs were deleted (under the placement lock): take the faces no pair names any more out of
    their splits' tally, and a labelled face deleted along with its pairs out of `deleted_split`'s."""
    ids = sorted(set(face_ids))
    deltas: Counter[str] = Counter()
    if deleted_split is not None:
        deltas[deleted_split] -= 1
    for start in range(0, len(ids), chunk):
        named_a = exists().where(FeedbackPair.face_a == Face.id)
        named_b = exists().where(FeedbackPair.face_b == Face.id)
        rows = session.execute(
            select(Face.split, func.count())
            .where(Face.id.in_(ids[start : start + chunk]), ~named_a, ~named_b)
            .group_by(Face.split)
        )
        for split, n in rows:
            deltas[split] -= n
    tallies.add_by_split(session, tallies.LABELLED_FACES, deltas)


def lock_placement(session: Session) -> None:
    """Serialise requests that may move faces, until this transaction ends.

    PostgreSQL: an advisory lock (then each later statement reads a fresh snapshot, read committed). SQLite:
    a write statement that changes nothing takes the database's one write lock for the transaction, after
    which every read sees the latest commit.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PLACEMENT_LOCK_KEY})
    else:
        session.execute(text("UPDATE faces SET split = split WHERE 0 = 1"))


def keeper_is_first(face_x: int, face_y: int) -> bool:
    """Whether the first face keeps its split when neither has a label: a coin fixed by the pair."""
    low, high = (face_x, face_y) if face_x < face_y else (face_y, face_x)
    digest = hashlib.sha256(low.to_bytes(16, "big") + high.to_bytes(16, "big")).digest()
    keep_low = digest[0] & 1 == 0
    return keep_low == (face_x == low)


@dataclass
class Shares:
    """Faces with labels per split, against the configured fractions: where a face may still go."""

    counts: dict[str, int]
    fractions: Mapping[str, float]

    def has_room(self, split: str) -> bool:
        """Whether one more labelled face keeps `split` within its share (plus a margin for small sets)."""
        total = sum(self.counts.values()) + 1
        margin = max(MIN_MARGIN_FACES, MARGIN_FRACTION * total)
        return self.counts.get(split, 0) + 1 <= self.fractions.get(split, 0.0) * total + margin

    def add(self, split: str, n: int = 1) -> None:
        self.counts[split] = self.counts.get(split, 0) + n


def place(face_x: int, face_y: int, splits: dict[int, str], labelled: set[int], shares: Shares) -> int | None:
    """Move at most one face of a pair into the other's split (mutating `splits`); the face moved, or None.

    `labelled` and `shares` are updated with both faces: once a pair names them, they never move again.
    """
    moved: int | None = None
    if splits[face_x] != splits[face_y]:
        x_free, y_free = face_x not in labelled, face_y not in labelled
        movers: list[int] = []
        if x_free and y_free:
            movers = [face_y, face_x] if keeper_is_first(face_x, face_y) else [face_x, face_y]
        elif x_free:
            movers = [face_x]
        elif y_free:
            movers = [face_y]
        for candidate in movers:
            partner = face_y if candidate == face_x else face_x
            if shares.has_room(splits[partner]):
                moved = candidate
                splits[moved] = splits[partner]
                break
    mark_labelled((face_x, face_y), splits, labelled, shares)
    return moved


def mark_labelled(faces: Iterable[int], splits: dict[int, str], labelled: set[int], shares: Shares) -> None:
    """Record that a pair names these faces: they never move again and count in their split's share."""
    for face in faces:
        if face not in labelled:
            labelled.add(face)
            shares.add(splits[face])


def store_moves(session: Session, moves: dict[int, str]) -> None:
    """Write the faces' new splits (not committed)."""
    if moves:
        session.execute(
            update(Face).execution_options(synchronize_session=False),
            [{"id": uuid.UUID(int=face), "split": split} for face, split in moves.items()],
        )
