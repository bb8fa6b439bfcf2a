"""Feedback over time (`GET /v1/metrics/feedback-series`): buckets counted by the database, on PostgreSQL and
on SQLite, over a bounded window read through the created_at index."""

from datetime import UTC, datetime, timedelta

from fastapi.testclient import TestClient
from sqlalchemy import event
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import get_engine, session_scope
from app.metrics.series import MAX_BUCKETS, Bucket, feedback_series
from app.tables import FeedbackPair
from tests.app.factories import face_row
from tests.app.problems import assert_problem

END = datetime(2026, 12, 7, 13, 30, tzinfo=UTC)
TODAY = datetime(2026, 12, 7, tzinfo=UTC)


def insert_feedback(settings: Settings, pairs: list[tuple[datetime, str, int]]) -> None:
    """One pair of two new faces per (created_at, split, label)."""
    with session_scope(settings.database_url) as session:
        for created_at, split, label in pairs:
            faces = [face_row(split="train"), face_row(split="train")]
            session.add_all(faces)
            session.flush()
            low, high = sorted(face.id for face in faces)
            pair = FeedbackPair(face_a=low, face_b=high, label=label, split=split, created_at=created_at)
            session.add(pair)


def series(settings: Settings, bucket: Bucket, buckets: int) -> dict[str, object]:
    with session_scope(settings.database_url) as session:
        return feedback_series(session=session, bucket=bucket, buckets=buckets, end=END).model_dump(
            mode="json"
        )


def test_days_count_each_split_and_label_and_nothing_outside_the_window(any_settings: Settings) -> None:
    insert_feedback(
        any_settings,
        [
            (TODAY + timedelta(hours=1), "train", 1),
            (TODAY + timedelta(hours=13), "train", 0),
            (TODAY, "cross", 0),  # the first instant of today is today's
            (TODAY - timedelta(microseconds=1), "test", 1),  # the last of yesterday is yesterday's
            (TODAY - timedelta(days=2), "regression", 1),
            (TODAY - timedelta(days=3), "val", 1),  # before the window
            (TODAY + timedelta(days=1), "val", 0),  # after it
        ],
    )

    body = series(any_settings, Bucket.DAY, 3)

    assert (body["start"], body["end"]) == (
        (TODAY - timedelta(days=2)).isoformat(),
        (TODAY + timedelta(days=1)).isoformat(),
    )
    assert body["splits"] == ["train", "val", "test", "cross", "regression"]
    assert body["wasted_split"] == "cross"
    points = body["points"]
    assert [p["start"] for p in points] == [(TODAY - timedelta(days=d)).isoformat() for d in (2, 1, 0)]
    assert [p["total"] for p in points] == [1, 1, 3]
    nonzero = [
        {
            (split, label): n
            for split, by_label in p["by_split_label"].items()
            for label, n in by_label.items()
            if n
        }
        for p in points
    ]
    assert nonzero == [
        {("regression", "1"): 1},
        {("test", "1"): 1},
        {("train", "1"): 1, ("train", "0"): 1, ("cross", "0"): 1},
    ]


def test_hours_are_utc_hours_ending_with_the_one_that_holds_end(any_settings: Settings) -> None:
    insert_feedback(
        any_settings, [(END - timedelta(minutes=29), "train", 1), (END - timedelta(minutes=31), "val", 0)]
    )

    points = series(any_settings, Bucket.HOUR, 2)["points"]

    assert [(p["start"], p["total"]) for p in points] == [
        (datetime(2026, 12, 7, 12, tzinfo=UTC).isoformat(), 1),
        (datetime(2026, 12, 7, 13, tzinfo=UTC).isoformat(), 1),
    ]


def test_the_window_is_read_through_the_created_at_index(any_settings: Settings) -> None:
    """Whatever the table holds, a request reads only its window's rows: the range on created_at is one the
    (created_at, id) index serves (PostgreSQL is told to avoid a full scan, which it would pick on a table
    this small)."""
    executed: list[tuple[str, object]] = []
    with get_engine(any_settings.database_url).connect() as connection:
        event.listen(connection, "before_cursor_execute", lambda *args: executed.append((args[2], args[3])))
        with Session(connection) as session:
            feedback_series(session=session, bucket=Bucket.DAY, buckets=3, end=END)
        ((statement, parameters),) = [(s, p) for s, p in executed if "FROM feedback" in s]
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
            explain = "EXPLAIN"
        else:
            explain = "EXPLAIN QUERY PLAN"
        plan = connection.exec_driver_sql(f"{explain} {statement}", parameters).all()
    assert "ix_feedback_created_at_id" in str(plan), plan


def test_the_api_answers_thirty_days_by_default_and_refuses_an_unbounded_window(client: TestClient) -> None:
    body = client.get("/v1/metrics/feedback-series").json()
    assert (body["bucket"], body["bucket_seconds"], len(body["points"])) == ("day", 86400, 30)
    assert len(client.get("/v1/metrics/feedback-series", params={"bucket": "hour"}).json()["points"]) == 48
    ended = client.get(
        "/v1/metrics/feedback-series", params={"bucket": "hour", "buckets": 3, "end": "2026-12-07T13:30:00"}
    ).json()
    assert ended["end"] == "2026-12-07T14:00:00+00:00", "a naive end is UTC"

    for params in (
        {"buckets": MAX_BUCKETS + 1},
        {"buckets": 0},
        {"bucket": "week"},
        {"end": "yesterday"},
        {"end": "9999-12-31T23:00:00Z"},
        {"end": "0001-01-01T00:00:00Z"},
    ):
        assert_problem(client.get("/v1/metrics/feedback-series", params=params), 422, "validation-error")
