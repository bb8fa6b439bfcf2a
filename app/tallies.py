"""Reading and adding to the maintained counts (`tallies`): a few rows instead of a scan of faces or feedback.

The database's triggers keep `feedback` and `faces` (migrations/versions/2026_12_07_0011_tallies.py); the api
adds to `labelled_faces` itself (app/feedback/placement.py).
"""

from collections.abc import Mapping

from sqlalchemy import delete, func, select, union
from sqlalchemy.orm import Session

from app.db import dialect_insert
from app.tables import Face, FeedbackPair, Tally

FEEDBACK = "feedback"
FACES = "faces"
LABELLED_FACES = "labelled_faces"
NO_LABEL = -1


def counts(session: Session, kind: str) -> dict[tuple[str, int], int]:
    """The count of each (split, label) of `kind`, summed over shards; label is -1 where a kind has none."""
    table = Tally.__table__.c  # Core columns: no ORM compile step on a first label's path
    rows = session.execute(
        select(table.split, table.label, func.sum(table.n))
        .where(table.kind == kind)
        .group_by(table.split, table.label)
    )
    return {(split, label): int(n) for split, label, n in rows}


def by_split(session: Session, kind: str) -> dict[str, int]:
    """The count of each split of `kind`, over every label."""
    totals: dict[str, int] = {}
    for (split, _label), n in counts(session, kind).items():
        totals[split] = totals.get(split, 0) + n
    return totals


def add_by_split(session: Session, kind: str, deltas: Mapping[str, int]) -> None:
    """Add `deltas` to the split counts of `kind` (not committed); the caller serialises its writers."""
    rows = [
        {"kind": kind, "split": split, "label": NO_LABEL, "shard": 0, "n": n}
        for split, n in sorted(deltas.items())
        if n
    ]
    if not rows:
        return
    # The table, not the entity: a Core upsert, without the ORM's bulk-insert machinery (a fifth of a first
    # label's CPU in the api went there).
    table = Tally.__table__
    statement = dialect_insert(session, table)
    statement = statement.on_conflict_do_update(
        index_elements=["kind", "split", "label", "shard"], set_={"n": table.c.n + statement.excluded.n}
    )
    session.execute(statement, rows)


def recount_labelled_faces(session: Session) -> None:
    """Count the faces with labels afresh (not committed): after pairs were written past the api (a bulk
    load), which keeps this tally itself. One scan of feedback: an operator's step, never a request's."""
    named = union(select(FeedbackPair.face_a), select(FeedbackPair.face_b)).subquery()
    rows = session.execute(
        select(Face.split, func.count()).where(Face.id.in_(select(named.c[0]))).group_by(Face.split)
    ).all()
    session.execute(delete(Tally).where(Tally.kind == LABELLED_FACES))
    add_by_split(session, LABELLED_FACES, {split: int(n) for split, n in rows})
