"""The maintained counts (`tallies`) equal a full count after every way faces and pairs change, on PostgreSQL
and on SQLite: batches, single posts, moves, retractions, a key's retraction, a face's cascade, plain SQL."""

import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from app import tallies
from app.blobs import BlobStore
from app.config import Settings
from app.db import get_engine, session_scope
from app.faces.service import delete_face
from app.feedback.schemas import FeedbackIn
from app.feedback.service import (
    delete_feedback,
    record_feedback,
    record_feedback_batch,
    retract_feedback_of_key,
)
from app.migrate import upgrade_database
from app.tables import Face, FeedbackPair
from tests.app.factories import face_row

BEFORE_TALLIES = "2026_12_07_0010"
KINDS = (tallies.FEEDBACK, tallies.FACES, tallies.LABELLED_FACES)


def kept(session: Session) -> dict[str, dict[tuple[str, int], int]]:
    return {kind: {key: n for key, n in tallies.counts(session, kind).items() if n} for kind in KINDS}


def counted(session: Session) -> dict[str, dict[tuple[str, int], int]]:
    """What the tallies should say, counted the slow way."""
    feedback = session.execute(
        select(FeedbackPair.split, FeedbackPair.label, func.count()).group_by(
            FeedbackPair.split, FeedbackPair.label
        )
    )
    faces = session.execute(select(Face.split, func.count()).group_by(Face.split))
    tallies.recount_labelled_faces(session)
    return {
        tallies.FEEDBACK: {(split, label): n for split, label, n in feedback},
        tallies.FACES: {(split, tallies.NO_LABEL): n for split, n in faces},
        tallies.LABELLED_FACES: kept(session)[tallies.LABELLED_FACES],
    }


def assert_tallies_match(settings: Settings) -> None:
    with session_scope(settings.database_url) as session:
        before = kept(session)
        assert before == counted(session)
        session.rollback()


def add_faces(settings: Settings, splits: list[str]) -> list[uuid.UUID]:
    with session_scope(settings.database_url) as session:
        faces = [face_row(split=split) for split in splits]
        session.add_all(faces)
        session.flush()
        return [face.id for face in faces]


def item(face_a: uuid.UUID, face_b: uuid.UUID, label: int = 1, **extra: str) -> dict[str, object]:
    return {"face_a": str(face_a), "face_b": str(face_b), "label": label, **extra}


def test_tallies_follow_every_change(any_settings: Settings, tmp_path: Path) -> None:
    url = any_settings.database_url
    a, b, c, d, e, f, g, h = add_faces(any_settings, ["train"] * 3 + ["val"] * 2 + ["test"] * 3)
    assert_tallies_match(any_settings)

    with session_scope(url) as session:  # a move (d joins train or a joins val), a cross pair, regression
        items = [item(a, b), item(a, d, 0), item(e, f), item(g, h, 1, split="regression")]
        record_feedback_batch(session=session, items=items, max_items=100, api_key_id="key1")
    assert_tallies_match(any_settings)

    with session_scope(url) as session:
        record_feedback(session=session, item=FeedbackIn(face_a=c, face_b=e, label=0))
        record_feedback(session=session, item=FeedbackIn(face_a=a, face_b=b, label=1))  # existing
    assert_tallies_match(any_settings)

    with session_scope(url) as session:
        pair_id = session.scalar(select(FeedbackPair.id).where(FeedbackPair.split == "regression"))
        assert pair_id is not None
        delete_feedback(session=session, feedback_id=pair_id)
    assert_tallies_match(any_settings)

    with session_scope(url) as session:
        assert retract_feedback_of_key(session=session, api_key_id="key1") == 3
    assert_tallies_match(any_settings)

    with session_scope(url) as session:
        record_feedback(session=session, item=FeedbackIn(face_a=a, face_b=h, label=0))
    with session_scope(url) as session:
        delete_face(session=session, store=BlobStore(tmp_path / "blobs"), face_id=a)
    assert_tallies_match(any_settings)

    with session_scope(url) as session:  # by hand, past the api
        session.execute(text("UPDATE faces SET split = 'test' WHERE split = 'val'"))
        session.execute(text("DELETE FROM feedback"))
    with session_scope(url) as session:  # pairs deleted by hand: only the api keeps `labelled_faces`
        tallies.recount_labelled_faces(session)
    assert_tallies_match(any_settings)


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_the_migration_counts_the_rows_already_there(
    dialect: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    sqlite_url = f"sqlite:///{tmp_path / 'magtune.db'}"
    url = request.getfixturevalue("postgres_database") if dialect == "postgresql" else sqlite_url
    upgrade_database(url, BEFORE_TALLIES)
    settings = Settings(database_url=url, data_dir=tmp_path / "data")
    a, b, c, d = add_faces(settings, ["train", "train", "val", "test"])
    with session_scope(url) as session:
        session.add_all(
            [
                FeedbackPair(face_a=min(a, b), face_b=max(a, b), label=1, split="train"),
                FeedbackPair(face_a=min(c, d), face_b=max(c, d), label=0, split="cross"),
            ]
        )
    upgrade_database(url)
    assert_tallies_match(settings)
    get_engine(url).dispose()
