"""The evaluate job in-process against real PostgreSQL, the MobileFaceNet checkpoint and the johns faces."""

from pathlib import Path

import pytest
from sqlalchemy import select

from app.blobs import BlobStore
from app.config import Settings
from app.db import session_scope
from app.tables import Evaluation, FeedbackPair
from tests.worker.factories import add_job, add_ready_base, get_job, run_in_process
from tests.worker.johns import add_johns


def test_evaluate_scores_a_split_and_compares_two_models_on_the_same_pairs(
    settings: Settings, store: BlobStore, johns_dir: Path, mobilefacenet_checkpoint: Path
) -> None:
    world = add_johns(settings, store, johns_dir, mobilefacenet_checkpoint, regression_per_person=3)
    with session_scope(settings.database_url) as session:
        other = add_ready_base(session, store, mobilefacenet_checkpoint, threshold=0.4)
        job = add_job(
            session, "evaluate", {"model": str(world.base_id), "split": "test", "compare_to": str(other.id)}
        )

    assert run_in_process(settings, job.id).status == "succeeded"
    with session_scope(settings.database_url) as session:
        result = get_job(session, job.id).result
        rows = session.scalars(select(Evaluation).where(Evaluation.job_id == job.id)).all()
        stored = session.execute(
            select(FeedbackPair.face_a, FeedbackPair.face_b).where(FeedbackPair.split == "test")
        ).all()
    test_pairs = sum(1 for pair in stored if not set(pair) & world.regression_faces)
    assert {row.model_id for row in rows} == {world.base_id, other.id}
    assert {row.pair_count for row in rows} == {result["pair_count"]} == {test_pairs}
    assert result["metrics"]["threshold_source"] == "val"
    assert result["compare_to"]["metrics"]["threshold_source"] == "model"
    assert result["compare_to"]["threshold"] == 0.4
    assert result["metrics"]["roc_auc"] is not None
    assert result["compare_to"]["deltas"]["roc_auc"] == pytest.approx(0.0)  # same weights, same ranking
