"""At volume, no request reads all of `faces` or `feedback`: the plans of what bench/volume.py times.

A few thousand faces and pairs, analysed, are enough for each planner to prefer a full scan where no index
serves a query. Every statement that /v1/metrics, the feedback and face lists (first page and a deep cursor)
and a single feedback post (a first label, and two labelled faces) send is explained. A scan of faces or
feedback passes only with an index condition, or as the ordered index scan of an unfiltered page, which
stops at its LIMIT. The fine-tune's loader is left out: it reads every pair by design.
"""

import json
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, event, insert, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import get_engine
from app.faces.service import list_faces
from app.feedback.schemas import FeedbackIn
from app.feedback.service import list_feedback, record_feedback
from app.metrics.service import dashboard
from app.pagination import PageParams, encode_cursor
from app.tables import Face, FeedbackPair
from tests.app.factories import face_row

FACES, PAIRS = 3000, 6000
TABLES = ("faces", "feedback")
KEY = b"plans"


@pytest.fixture
def seeded(any_settings: Settings) -> Iterator[Connection]:
    """A connection to a database of FACES faces and PAIRS pairs, analysed."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    faces = []
    for index in range(FACES):
        face = face_row(split=("train", "val", "test")[index % 3])
        faces.append({column.key: getattr(face, column.key) for column in Face.__table__.columns})
        faces[-1].update(id=uuid.uuid4(), created_at=start + timedelta(minutes=index))
    pairs = []
    for index in range(PAIRS):
        x, y = faces[index % FACES], faces[(7 * index + 1 + index // FACES) % FACES]
        low, high = sorted((x["id"], y["id"]))
        split = x["split"] if x["split"] == y["split"] else "cross"
        created = start + timedelta(seconds=30 * index)
        pairs.append({"id": uuid.uuid4(), "face_a": low, "face_b": high, "label": index % 2, "split": split})
        pairs[-1]["created_at"] = created
    engine = get_engine(any_settings.database_url)
    with engine.begin() as connection:
        connection.execute(insert(Face), faces)
        connection.execute(insert(FeedbackPair), pairs)
    with engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql("ANALYZE faces")
            connection.exec_driver_sql("ANALYZE feedback")
        else:
            connection.exec_driver_sql("ANALYZE")
        connection.commit()
        yield connection


def statements(connection: Connection, operation: Callable[[Session], Any]) -> list[tuple[str, Any]]:
    """The statements `operation` sends that name faces or feedback, if any (then rolled back)."""
    sent: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        if any(f" {table}" in statement for table in TABLES):
            sent.append((statement, parameters))

    event.listen(connection, "before_cursor_execute", record)
    try:
        with Session(connection) as session:
            operation(session)
            session.rollback()
    finally:
        event.remove(connection, "before_cursor_execute", record)
    return sent


def pg_full_scans(node: dict[str, Any], limited: bool = False) -> list[str]:
    """Scans of faces or feedback in a JSON plan that neither use an index condition nor stop at a LIMIT."""
    limited = limited or node["Node Type"] == "Limit"
    found = []
    if node.get("Relation Name") in TABLES and node["Node Type"].endswith("Scan"):  # not the write itself
        conditioned = "Index Cond" in node or "Recheck Cond" in node
        # A page read in index order, stopped by its LIMIT; a filter on it could read the rest of the table.
        ordered_page = (
            limited and node["Node Type"] in ("Index Scan", "Index Only Scan") and "Filter" not in node
        )
        if not (conditioned or ordered_page):
            found.append(f"{node['Node Type']} on {node['Relation Name']}")
    for child in node.get("Plans", []):
        found += pg_full_scans(child, limited)
    return found


def full_scans(connection: Connection, statement: str, parameters: Any) -> list[str]:
    if isinstance(parameters, list):  # executemany: one row's plan is every row's
        parameters = parameters[0]
    if connection.dialect.name == "postgresql":
        (plan,) = connection.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {statement}", parameters).scalar_one()
        plan = json.loads(plan) if isinstance(plan, str) else plan
        return pg_full_scans(plan["Plan"])
    if "WHERE 0 = 1" in statement:  # SQLite's placement lock: a write that reads nothing
        return []
    details = [row[3] for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)]
    paged = "LIMIT" in statement and "WHERE" not in statement  # a first page, in index order
    return [
        detail
        for detail in details
        if any(
            detail == f"SCAN {table}" or (detail.startswith(f"SCAN {table} ") and not paged)
            for table in TABLES
        )
    ]


def deep_cursor(connection: Connection, model: Any) -> str:
    """A cursor three quarters down the list, as a client paging from the newest would hold it."""
    created_at, row_id = connection.execute(
        select(model.created_at, model.id)
        .order_by(model.created_at.desc(), model.id.desc())
        .offset(int(0.75 * (FACES if model is Face else PAIRS)))
        .limit(1)
    ).one()
    return encode_cursor(KEY, model.__tablename__, created_at, row_id)


def operations(connection: Connection) -> dict[str, Callable[[Session], Any]]:
    first = PageParams(limit=50, cursor=None, key=KEY)
    deep_feedback = PageParams(limit=50, cursor=deep_cursor(connection, FeedbackPair), key=KEY)
    deep_faces = PageParams(limit=50, cursor=deep_cursor(connection, Face), key=KEY)
    stored = {tuple(pair) for pair in connection.execute(select(FeedbackPair.face_a, FeedbackPair.face_b))}
    labelled_a = min(face for pair in stored for face in pair)
    other = next(
        face
        for pair in sorted(stored)
        for face in pair
        if face != labelled_a and (labelled_a, face) not in stored and (face, labelled_a) not in stored
    )
    newcomer = face_row(split="test")

    def first_label(session: Session) -> None:
        session.add(newcomer)
        session.flush()
        record_feedback(session=session, item=FeedbackIn(face_a=newcomer.id, face_b=labelled_a, label=1))

    def both_labelled(session: Session) -> None:  # a new pair of two faces that have pairs
        record_feedback(session=session, item=FeedbackIn(face_a=labelled_a, face_b=other, label=0))

    return {
        "metrics": lambda session: dashboard(session=session),
        "feedback first page": lambda session: list_feedback(session=session, page=first),
        "feedback deep page": lambda session: list_feedback(session=session, page=deep_feedback),
        "faces first page": lambda session: list_faces(session=session, page=first),
        "faces deep page": lambda session: list_faces(session=session, page=deep_faces),
        "first-label post": first_label,
        "post of two labelled faces": both_labelled,
    }


def test_no_operation_scans_all_faces_or_feedback(seeded: Connection) -> None:
    scans = {
        name: [
            scan
            for statement, parameters in statements(seeded, operation)
            for scan in full_scans(seeded, statement, parameters)
        ]
        for name, operation in operations(seeded).items()
    }
    assert {name: found for name, found in scans.items() if found} == {}
