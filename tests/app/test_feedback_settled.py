"""A pair of two labelled faces in one statement: stored as the general path would store it, or left to it."""

import asyncio
import threading
import time
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, select

from app.config import Settings
from app.db import session_scope
from app.feedback.schemas import FeedbackIn
from app.feedback.settled import POOL_WAIT_S, SettledPairs
from app.migrate import upgrade_database
from app.tables import Face, FeedbackPair
from app.tallies import FEEDBACK, LABELLED_FACES, by_split, counts
from tests.app.factories import insert_face


def labelled_faces(client: TestClient, settings: Settings, *splits: str) -> list[uuid.UUID]:
    """One face per split given, each already named by a stored pair (with a partner of its own split)."""
    faces = []
    for split in splits:
        face, partner = insert_face(settings, split=split), insert_face(settings, split=split)
        posted = client.post("/v1/feedback", json={"face_a": str(face), "face_b": str(partner), "label": 0})
        assert posted.status_code == 201
        faces.append(face)
    return faces


def stored_pairs(settings: Settings, face_x: uuid.UUID, face_y: uuid.UUID) -> list[FeedbackPair]:
    low, high = sorted((face_x, face_y))
    with session_scope(settings.database_url) as session:
        pairs = session.scalars(
            select(FeedbackPair).where(FeedbackPair.face_a == low, FeedbackPair.face_b == high)
        ).all()
        session.expunge_all()
        return list(pairs)


def record(database_url: str, item: FeedbackIn, api_key_id: str | None = None) -> FeedbackPair | None:
    """`SettledPairs.record` as the api runs it: on an event loop, through a pool opened for it."""

    async def opened_and_recorded() -> FeedbackPair | None:
        pairs = SettledPairs(database_url, max_size=2)
        await pairs.open()
        try:
            return await pairs.record(item, api_key_id)
        finally:
            await pairs.close()

    return asyncio.run(opened_and_recorded())


def item(face_x: uuid.UUID, face_y: uuid.UUID, label: int = 1, **extra: object) -> FeedbackIn:
    return FeedbackIn.model_validate({"face_a": face_x, "face_b": face_y, "label": label, **extra})


@pytest.mark.parametrize(("splits", "expected"), [(("val", "val"), "val"), (("train", "test"), "cross")])
def test_a_pair_of_labelled_faces_is_stored_with_the_split_the_general_path_gives(
    client: TestClient, settings: Settings, splits: tuple[str, str], expected: str
) -> None:
    x, y = labelled_faces(client, settings, *splits)

    stored = record(settings.database_url, item(y, x, annotator="ana", source="console"), "key0")

    assert stored is not None
    assert (stored.face_a, stored.face_b, stored.split) == (*sorted((x, y)), expected)
    (row,) = stored_pairs(settings, x, y)  # committed: another session reads it
    assert (row.id, row.label, row.split, row.annotator, row.source, row.api_key_id) == (
        stored.id,
        1,
        expected,
        "ana",
        "console",
        "key0",
    )


def test_the_api_answers_a_settled_pair_as_before_and_the_tallies_follow(
    client: TestClient, settings: Settings
) -> None:
    x, y = labelled_faces(client, settings, "train", "val")
    with session_scope(settings.database_url) as session:
        before, labelled_before = counts(session, FEEDBACK), by_split(session, LABELLED_FACES)

    settled = client.app.state.settled_pairs  # type: ignore[attr-defined]
    stored_before = settled.stored

    posted = client.post("/v1/feedback", json={"face_a": str(x), "face_b": str(y), "label": 1})

    assert posted.status_code == 201
    assert settled.stored == stored_before + 1  # this path stored it, not the general one
    body = posted.json()
    assert posted.headers["location"] == f"/v1/feedback/{body['id']}"
    assert client.get(posted.headers["location"]).json() == body
    assert (body["split"], body["label"], body["face_a"]) == ("cross", 1, str(min(x, y)))
    with session_scope(settings.database_url) as session:
        after, labelled_after = counts(session, FEEDBACK), by_split(session, LABELLED_FACES)
    assert after[("cross", 1)] == before.get(("cross", 1), 0) + 1
    assert labelled_after == labelled_before  # both faces were counted already


def test_anything_else_is_left_to_the_general_path_and_nothing_is_stored(
    client: TestClient, settings: Settings
) -> None:
    x, y = labelled_faces(client, settings, "train", "train")
    newcomer = insert_face(settings, split="train")
    existing = client.post("/v1/feedback", json={"face_a": str(x), "face_b": str(y), "label": 1}).json()
    leftovers = {
        "a face without a label": item(x, newcomer),
        "an unknown face": item(x, uuid.uuid4()),
        "a face with itself": item(x, x),
        "a stored pair, same label": item(y, x, 1),
        "a stored pair, another label": item(x, y, 0),
        "a regression pair": item(x, labelled_faces(client, settings, "train")[0], split="regression"),
        "a lease's answer": item(x, labelled_faces(client, settings, "train")[0], lease_id=uuid.uuid4()),
    }
    with session_scope(settings.database_url) as session:
        before = session.scalars(select(FeedbackPair.id)).all()

    for case, leftover in leftovers.items():
        assert record(settings.database_url, leftover) is None, case

    with session_scope(settings.database_url) as session:
        assert sorted(session.scalars(select(FeedbackPair.id)).all()) == sorted(before)
    assert [pair.id for pair in stored_pairs(settings, x, y)] == [uuid.UUID(existing["id"])]


def test_a_face_deleted_while_the_statement_waits_leaves_it_to_the_general_path(
    client: TestClient, settings: Settings
) -> None:
    """The statement reads both faces, then its foreign key waits on the deleting transaction; once that
    commits the insert fails, nothing is stored, and the general path answers (unknown face)."""
    x, y = labelled_faces(client, settings, "train", "train")
    outcome: list[object] = []
    with session_scope(settings.database_url) as deleting:
        deleting.execute(delete(Face).where(Face.id == y))
        worker = threading.Thread(target=lambda: outcome.append(record(settings.database_url, item(x, y))))
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive(), "the insert should wait on the deleted face's row lock"
    worker.join(timeout=30)

    assert outcome == [None]
    assert stored_pairs(settings, x, y) == []
    answered = client.post("/v1/feedback", json={"face_a": str(x), "face_b": str(y), "label": 1})
    assert (answered.status_code, answered.json()["type"].rsplit("/", 1)[-1]) == (422, "unknown-face")


def test_sqlite_always_takes_the_general_path(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'magtune.db'}"
    upgrade_database(url)

    assert record(url, item(uuid.uuid4(), uuid.uuid4())) is None


def test_an_unreachable_database_leaves_the_pair_to_the_general_path_within_the_pool_wait() -> None:
    """The general path then answers 503 database-unavailable (tests/app/test_failures.py), as before."""
    started = time.monotonic()

    assert record("postgresql+psycopg://root@127.0.0.1:1/magtune", item(uuid.uuid4(), uuid.uuid4())) is None
    assert time.monotonic() - started < POOL_WAIT_S + 5


def test_two_clients_posting_one_pair_at_once_store_it_once(client: TestClient, settings: Settings) -> None:
    """Both statements race on the pair's unique key: one inserts, the other gets None and the general path
    answers it as the pair stored before (200, the same id)."""
    x, y = labelled_faces(client, settings, "train", "train")

    async def both_at_once() -> list[FeedbackPair | None]:
        pairs = SettledPairs(settings.database_url, max_size=2)
        await pairs.open()
        try:
            return list(await asyncio.gather(pairs.record(item(x, y), None), pairs.record(item(y, x), None)))
        finally:
            await pairs.close()

    outcomes = asyncio.run(both_at_once())

    (stored,) = [outcome for outcome in outcomes if outcome is not None]
    assert outcomes.count(None) == 1
    assert [pair.id for pair in stored_pairs(settings, x, y)] == [stored.id]
    again = client.post("/v1/feedback", json={"face_a": str(y), "face_b": str(x), "label": 1})
    assert (again.status_code, again.json()["id"]) == (200, str(stored.id))
