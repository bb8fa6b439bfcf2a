"""The feedback data the jobs load, against real PostgreSQL and the johns faces."""

from pathlib import Path

from sqlalchemy import select

from app.blobs import BlobStore
from app.config import Settings
from app.db import session_scope
from app.tables import FeedbackPair
from tests.worker.johns import TRAINED_PEOPLE, add_johns
from worker.jobs.data import load_feedback


def test_regression_faces_are_kept_out_of_training_and_judging(
    settings: Settings, store: BlobStore, johns_dir: Path, mobilefacenet_checkpoint: Path
) -> None:
    world = add_johns(settings, store, johns_dir, mobilefacenet_checkpoint, regression_per_person=4)
    with session_scope(settings.database_url) as session:
        sets = load_feedback(session)
        stored = session.execute(select(FeedbackPair.face_a, FeedbackPair.face_b, FeedbackPair.split)).all()

    for name in ("train", "val", "test"):
        assert not sets.faces(name) & world.regression_faces
    assert sets.faces("regression") == world.regression_faces
    naming_regression = [
        row for row in stored if row.split == "train" and {row.face_a, row.face_b} & world.regression_faces
    ]
    assert naming_regression, "the data should hold train pairs that name a regression face"
    snapshot = sets.snapshot()
    assert snapshot["excluded_for_regression_faces"]["train"] == len(naming_regression)
    expected_train = sum(1 for row in stored if row.split == "train") - len(naming_regression)
    assert snapshot["pairs"]["train"]["total"] == expected_train
    assert {world.faces[f] for f in sets.faces("train")} <= set(TRAINED_PEOPLE)
    assert snapshot["pairs"]["regression"]["same"] > 0 and snapshot["pairs"]["regression"]["different"] > 0
