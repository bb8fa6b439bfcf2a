"""Feedback pairs: canonical order, the pair's split, conflicts, and fast batch ingestion.

A pair is stored once, as (face_a, face_b) with face_a < face_b, so (a, b) and (b, a) are the same pair.
Its split follows its faces: "regression" when posted so; the faces' common split when they share one;
otherwise "cross", a pair across splits that is used for neither training nor evaluation (training on it
would let a test face leak into training through its partner). Before that, a face without labels joins its
partner's split (`placement`), so fewer labels are wasted.

Ingestion works on whole batches: one query for the faces, one INSERT ... ON CONFLICT DO NOTHING RETURNING id
(PostgreSQL: whole columns, packed, see PG_INSERT; SQLite: multi-row VALUES), and one read of the pairs that
already existed, so a 10,000-pair batch is a handful of statements whatever its size. A single post of two
faces that already have labels is stored before it gets here, in one statement (app/feedback/settled.py).
"""

import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError
from sqlalchemy import Table, delete, or_, select, tuple_
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.domain import FeedbackSplit
from app.feedback import placement
from app.feedback.schemas import FeedbackIn
from app.pagination import PageParams, fetch_page
from app.problems import PROBLEM_TYPE_BASE, Problem, not_found
from app.splits import DEFAULT_SPLIT_FRACTIONS
from app.tables import FeedbackPair, utcnow

REGRESSION_SPLIT = FeedbackSplit.REGRESSION
CROSS_SPLIT = FeedbackSplit.CROSS
_PAIRS_PER_QUERY = 2000
_TABLE: Table = FeedbackPair.__table__  # type: ignore[assignment]
_T = TypeVar("_T")
_ITEMS = TypeAdapter(list[FeedbackIn])
_COLUMNS = ("id", "face_a", "face_b", "label", "split")


# PostgreSQL gets whole columns, not rows: one statement and ten parameters for any batch size, where a
# multi-row VALUES list would need nine parameters per row. psycopg dumps an array element by element in
# Python, so the columns travel in the forms cheapest to build: the three UUID columns and the labels as one
# bytea each (16 bytes, or 1, per row, cut apart by the server), the text columns as binary arrays
# (`%(name)b`, run with exec_driver_sql; a text array's every element is quoted here and parsed there), and
# the inserted ids come back as one bytea. That cut a 10,000-pair batch's CPU in the service by about a
# third (bench/README.md); tests/app/test_feedback.py checks that every column round-trips. A column added
# to `feedback` must be added here.
def _uuid_at(name: str) -> str:
    """The row's UUID out of the packed column `name` (the row's ordinality `n` counts from 1)."""
    start = "CAST(incoming.n AS integer) * 16 - 15"
    return f"CAST(encode(substring(%({name})b FROM {start} FOR 16), 'hex') AS uuid)"


PG_INSERT = f"""
WITH inserted AS (
    INSERT INTO feedback (id, face_a, face_b, label, split, annotator, source, api_key_id, created_at)
    SELECT {_uuid_at("ids")}, {_uuid_at("faces_a")}, {_uuid_at("faces_b")},
           get_byte(%(labels)b, CAST(incoming.n AS integer) - 1),
           incoming.split, incoming.annotator, incoming.source,
           CAST(%(api_key_id)s AS varchar), %(created_at)s
    FROM unnest(
        CAST(%(splits)b AS varchar[]), CAST(%(annotators)b AS varchar[]), CAST(%(sources)b AS varchar[])
    ) WITH ORDINALITY AS incoming(split, annotator, source, n)
    ON CONFLICT (face_a, face_b) DO NOTHING
    RETURNING id
)
SELECT string_agg(uuid_send(id), ''::bytea) FROM inserted
"""


def pg_insert_parameters(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """PG_INSERT's parameters for `rows` (canonical pairs, the same key and time): every column at once."""
    return {
        "ids": b"".join(row["id"].bytes for row in rows),
        "faces_a": b"".join(row["face_a"].bytes for row in rows),
        "faces_b": b"".join(row["face_b"].bytes for row in rows),
        "labels": bytes(row["label"] for row in rows),
        "splits": [row["split"] for row in rows],
        "annotators": [row["annotator"] for row in rows],
        "sources": [row["source"] for row in rows],
        "api_key_id": rows[0]["api_key_id"],
        "created_at": rows[0]["created_at"],
    }


def uuid_ints(packed: bytes | None) -> set[int]:
    """UUIDs sent back as one bytea of 16 bytes each, as integers."""
    if not packed:
        return set()
    return {int.from_bytes(packed[start : start + 16], "big") for start in range(0, len(packed), 16)}


_PG_EXISTING = (
    f"SELECT {', '.join(f'feedback.{name}' for name in _COLUMNS)} FROM feedback "
    "JOIN unnest(CAST(%(face_a)b AS uuid[]), CAST(%(face_b)b AS uuid[])) AS wanted(face_a, face_b) "
    "ON feedback.face_a = wanted.face_a AND feedback.face_b = wanted.face_b"
)


@dataclass(slots=True)
class StoredPair:
    """What an incoming item is compared with: the stored pair's id, label and split."""

    id: uuid.UUID
    label: int
    split: str


@dataclass(slots=True)
class Recorded:
    pair: StoredPair
    created: bool


_PairKey = tuple[int, int]
"""A canonical pair as the faces' UUIDs in integer form: hashed and compared at C speed in the hot loop."""


def random_uuids(count: int) -> Iterator[uuid.UUID]:
    """Version-4 UUIDs, as uuid4() makes them, from one read of the OS's random source instead of one per id
    (a 10,000-pair batch spent 30 ms of CPU in uuid4())."""
    raw = os.urandom(16 * count)
    for start in range(0, len(raw), 16):
        yield uuid.UUID(bytes=raw[start : start + 16], version=4)


def canonical_pair(face_x: uuid.UUID, face_y: uuid.UUID) -> tuple[uuid.UUID, uuid.UUID]:
    return (face_x, face_y) if face_x < face_y else (face_y, face_x)


def pair_split(requested: str | None, split_a: str, split_b: str) -> str:
    """A FeedbackSplit value; the faces' own split passes through unconverted (this runs once per item)."""
    if requested == REGRESSION_SPLIT:
        return REGRESSION_SPLIT
    return split_a if split_a == split_b else CROSS_SPLIT


def record_feedback(
    *,
    session: Session,
    item: FeedbackIn,
    fractions: Mapping[str, float] = DEFAULT_SPLIT_FRACTIONS,
    api_key_id: str | None = None,
) -> tuple[FeedbackPair, bool]:
    """Record one pair (not committed): the stored pair and whether it is new; a refusal is raised."""
    now = utcnow()
    (outcome,) = ingest_feedback(
        session=session, items=[item], now=now, fractions=fractions, api_key_id=api_key_id
    )
    if isinstance(outcome, Problem):
        raise outcome
    if outcome.created:  # every value is known: no need to read the row back
        face_a, face_b = canonical_pair(item.face_a, item.face_b)
        new = FeedbackPair(
            id=outcome.pair.id,
            face_a=face_a,
            face_b=face_b,
            label=outcome.pair.label,
            split=outcome.pair.split,
            annotator=item.annotator,
            source=item.source,
            created_at=now,
            api_key_id=api_key_id,
        )
        return new, True
    stored = session.get(FeedbackPair, outcome.pair.id)
    if stored is None:
        raise _retracted_meanwhile()
    return stored, outcome.created


@dataclass(slots=True)
class BatchOutcome:
    body: dict[str, Any]
    """The response (see `FeedbackBatchOut`) as plain JSON values: ten thousand pydantic models only to
    serialise them again would cost more than the database work."""
    created_by_label: dict[int, int]


def record_feedback_batch(
    *,
    session: Session,
    items: Sequence[Any],
    max_items: int,
    fractions: Mapping[str, float] = DEFAULT_SPLIT_FRACTIONS,
    api_key_id: str | None = None,
) -> BatchOutcome:
    """Record every good item of a batch (not committed) and report each bad one; over `max_items`, none."""
    if len(items) > max_items:
        raise Problem(
            413,
            "batch-too-large",
            "Batch too large",
            f"{len(items)} items, over the limit of {max_items} per batch; nothing was stored",
            max_items=max_items,
        )
    parsed = [_no_lease(item) for item in _parse_items(items)]
    outcomes = ingest_feedback(session=session, items=parsed, fractions=fractions, api_key_id=api_key_id)
    results: list[dict[str, Any]] = []
    counts = {"created": 0, "existing": 0, "error": 0}
    created_by_label = {0: 0, 1: 0}
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, Problem):
            results.append({"index": index, "status": "error", "error": _item_error(outcome)})
            counts["error"] += 1
        else:
            status = "created" if outcome.created else "existing"
            results.append(
                {"index": index, "status": status, "id": str(outcome.pair.id), "split": outcome.pair.split}
            )
            counts[status] += 1
            if outcome.created:
                created_by_label[outcome.pair.label] += 1
    body = {
        "results": results,
        "created": counts["created"],
        "existing": counts["existing"],
        "failed": counts["error"],
    }
    return BatchOutcome(body=body, created_by_label=created_by_label)


def ingest_feedback(
    *,
    session: Session,
    items: Sequence[FeedbackIn | Problem],
    now: datetime | None = None,
    fractions: Mapping[str, float] = DEFAULT_SPLIT_FRACTIONS,
    api_key_id: str | None = None,
) -> list[Recorded | Problem]:
    """The outcome of each item, in order: its stored pair (new or existing) or why it was refused.

    A pair named twice in the batch is inserted once, by its first item; later items compare against it
    like any existing pair. The same pair with another label is a conflict: retract it first to change it.
    """
    outcomes: list[Recorded | Problem | None] = [
        item if isinstance(item, Problem) else None for item in items
    ]
    valid = [(index, item) for index, item in enumerate(items) if isinstance(item, FeedbackIn)]
    named = {face for _, item in valid for face in (item.face_a, item.face_b)}
    splits, labelled = placement.face_states(session, named)
    shares = placement.Shares({}, fractions)
    first_labels = any(face.int in splits and face.int not in labelled for face in named)
    if first_labels:
        # A first label may move a face: decide on what is committed once no one else can move it.
        placement.lock_placement(session)
        splits, labelled = placement.face_states(session, named)
        shares = placement.labelled_shares(session, fractions)
    labelled_before = set(labelled)

    now = now or utcnow()
    ids = random_uuids(len(valid))
    new_rows: dict[_PairKey, dict[str, Any]] = {}
    keyed: list[tuple[int, FeedbackIn, _PairKey]] = []
    moves: dict[int, str] = {}
    for index, item in valid:
        a, b = item.face_a.int, item.face_b.int
        if a == b:
            outcomes[index] = Problem(422, "same-face", "Same face", "a face cannot be paired with itself")
        elif a not in splits or b not in splits:
            outcomes[index] = _unknown_faces(item, splits)
        else:
            if item.split == REGRESSION_SPLIT:
                placement.mark_labelled((a, b), splits, labelled, shares)
            elif (moved := placement.place(a, b, splits, labelled, shares)) is not None:
                moves[moved] = splits[moved]
            split_a, split_b = splits[a], splits[b]
            key, low, high = (
                ((a, b), item.face_a, item.face_b) if a < b else ((b, a), item.face_b, item.face_a)
            )
            keyed.append((index, item, key))
            if key not in new_rows:
                new_rows[key] = {
                    "id": next(ids),
                    "face_a": low,
                    "face_b": high,
                    "label": item.label,
                    "split": pair_split(item.split, split_a, split_b),
                    "annotator": item.annotator,
                    "source": item.source,
                    "api_key_id": api_key_id,
                    "created_at": now,
                }

    placement.store_moves(session, moves)
    try:
        inserted = _insert_new_pairs(session, list(new_rows.values()))
    except IntegrityError as exc:
        # Only a foreign key can fail here (conflicts are skipped): a face went away since it was read.
        raise Problem(
            409,
            "concurrent-change",
            "Concurrent change",
            "a face was deleted meanwhile; send the pairs again",
        ) from exc
    stored = {
        key: StoredPair(row["id"], row["label"], row["split"])
        for key, row in new_rows.items()
        if row["id"].int in inserted
    }
    if first_labels:
        named_now = {face for key in stored for face in key}
        placement.count_first_labels(session, named_now - labelled_before, splits)
    stored.update(_existing_pairs(session, [row for key, row in new_rows.items() if key not in stored]))

    claimed: set[int] = set()
    for index, item, key in keyed:
        pair = stored.get(key)
        if pair is None:
            outcomes[index] = _retracted_meanwhile()
            continue
        pair_id = pair.id.int
        created = pair_id in inserted and pair_id not in claimed
        claimed.add(pair_id)
        outcomes[index] = Recorded(pair, created) if created else _compare(item, pair)
    return outcomes  # type: ignore[return-value]


def get_feedback(*, session: Session, feedback_id: uuid.UUID) -> FeedbackPair:
    pair = session.get(FeedbackPair, feedback_id)
    if pair is None:
        raise not_found("feedback", feedback_id)
    return pair


def list_feedback(
    *,
    session: Session,
    page: PageParams,
    label: int | None = None,
    split: str | None = None,
    face: uuid.UUID | None = None,
    api_key: str | None = None,
) -> tuple[Sequence[FeedbackPair], str | None]:
    either_side = [or_(FeedbackPair.face_a == face, FeedbackPair.face_b == face)] if face is not None else []
    return fetch_page(session, FeedbackPair, page, *either_side, label=label, split=split, api_key_id=api_key)


def retract_feedback_of_key(*, session: Session, api_key_id: str) -> int:
    """Delete every pair the key posted (committed); how many. Idempotent: a second call deletes none."""
    placement.lock_placement(session)
    deleted = session.execute(
        delete(FeedbackPair)
        .where(FeedbackPair.api_key_id == api_key_id)
        .returning(FeedbackPair.face_a, FeedbackPair.face_b)
        .execution_options(synchronize_session=False)
    ).all()
    placement.forget_labels(session, {face for pair in deleted for face in pair})
    session.commit()
    return len(deleted)


def delete_feedback(*, session: Session, feedback_id: uuid.UUID) -> None:
    placement.lock_placement(session)
    pair = get_feedback(session=session, feedback_id=feedback_id)
    faces = (pair.face_a, pair.face_b)
    session.delete(pair)
    session.flush()
    placement.forget_labels(session, faces)
    session.commit()


def _parse_items(items: Sequence[Any]) -> list[FeedbackIn | Problem]:
    try:
        return list(_ITEMS.validate_python(items))
    except ValidationError:
        return [_parse_item(raw) for raw in items]


def _no_lease(item: FeedbackIn | Problem) -> FeedbackIn | Problem:
    """Leases are answered one by one (POST /v1/feedback), where the lease is checked and released."""
    if isinstance(item, FeedbackIn) and item.lease_id is not None:
        return Problem(
            422,
            "lease-in-batch",
            "Lease in a batch",
            "answer a review lease with POST /v1/feedback, one pair at a time",
            errors=[{"loc": ["lease_id"], "msg": "not accepted in a batch", "type": "lease_in_batch"}],
        )
    return item


def _parse_item(raw: Any) -> FeedbackIn | Problem:
    try:
        return FeedbackIn.model_validate(raw)
    except ValidationError as exc:
        errors = [
            {"loc": list(error["loc"]), "msg": error["msg"], "type": error["type"]} for error in exc.errors()
        ]
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'item'}: {e['msg']}" for e in errors[:5])
        return Problem(422, "validation-error", "Invalid item", detail, errors=errors)


def _unknown_faces(item: FeedbackIn, splits: dict[int, str]) -> Problem:
    missing = [name for name in ("face_a", "face_b") if getattr(item, name).int not in splits]
    return Problem(
        422,
        "unknown-face",
        "Unknown face",
        "; ".join(f"{name}: no face with id {getattr(item, name)}" for name in missing),
        errors=[{"loc": ["body", name], "msg": "unknown face", "type": "unknown_face"} for name in missing],
    )


def _retracted_meanwhile() -> Problem:
    return Problem(
        409, "concurrent-change", "Concurrent change", "the pair was retracted while being recorded"
    )


def _compare(item: FeedbackIn, pair: StoredPair) -> Recorded | Problem:
    if pair.label != item.label:
        return Problem(
            409,
            "conflicting-label",
            "Conflicting label",
            f"feedback {pair.id} already records this pair with label {pair.label}; "
            "retract it (DELETE /v1/feedback/{id}) to change the label",
            feedback_id=str(pair.id),
        )
    if item.split == REGRESSION_SPLIT and pair.split != REGRESSION_SPLIT:
        return Problem(
            409,
            "conflicting-split",
            "Conflicting split",
            f"feedback {pair.id} already records this pair in split '{pair.split}'; "
            "retract it to record it in the regression set",
            feedback_id=str(pair.id),
        )
    return Recorded(pair, created=False)


def _item_error(problem: Problem) -> dict[str, Any]:
    error = {"type": PROBLEM_TYPE_BASE + problem.kind, "title": problem.title, "detail": problem.detail}
    if problem.errors is not None:
        error["errors"] = problem.errors
    if "feedback_id" in problem.extra:
        error["feedback_id"] = problem.extra["feedback_id"]
    return error


def _insert_new_pairs(session: Session, rows: list[dict[str, Any]]) -> set[int]:
    """Insert the pairs not stored yet; the ids (as integers) of the rows actually inserted."""
    if not rows:
        return set()
    if _dialect(session) == "postgresql":
        packed = session.connection().exec_driver_sql(PG_INSERT, pg_insert_parameters(rows)).scalar()
        return uuid_ints(packed)
    statement = sqlite.insert(_TABLE).on_conflict_do_nothing(index_elements=["face_a", "face_b"])
    return {pair_id.int for pair_id in session.execute(statement.returning(_TABLE.c.id), rows).scalars()}


def _existing_pairs(session: Session, rows: list[dict[str, Any]]) -> dict[_PairKey, StoredPair]:
    """The stored pairs that `rows` (canonical, not inserted) collided with."""
    if not rows:
        return {}
    keys = [(row["face_a"], row["face_b"]) for row in rows]
    if _dialect(session) == "postgresql":
        faces_a, faces_b = (list(side) for side in zip(*keys, strict=True))
        wanted = {"face_a": faces_a, "face_b": faces_b}
        found = session.connection().exec_driver_sql(_PG_EXISTING, wanted).all()
    else:
        found = []
        columns = [_TABLE.c[name] for name in _COLUMNS]
        for chunk in _chunks(keys, _PAIRS_PER_QUERY):
            statement = select(*columns).where(tuple_(_TABLE.c.face_a, _TABLE.c.face_b).in_(chunk))
            found.extend(session.execute(statement).all())
    return {
        (face_a.int, face_b.int): StoredPair(pair_id, label, split)
        for pair_id, face_a, face_b, label, split in found
    }


def _dialect(session: Session) -> str:
    name = session.get_bind().dialect.name
    if name not in {"postgresql", "sqlite"}:
        raise NotImplementedError(f"feedback ingestion needs PostgreSQL or SQLite, not {name}")
    return name


def _chunks(values: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]
