"""The evaluate job in-process against real PostgreSQL, the MobileFaceNet checkpoint and the johns faces."""

from pathlib import Path

import pytest
from sqlalchemy import delete, func, select, update

from app.blobs import BlobStore
from app.config import Settings
from app.db import session_scope
from app.tables import Evaluation, FeedbackPair, ModelVersion
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
    intervals = result["compare_to"]["intervals"]  # the paired face bootstrap of the differences
    assert intervals["samples"] == settings.gate_bootstrap_samples and intervals["pairs"] == test_pairs
    assert 0 < intervals["valid"] <= intervals["samples"]
    # the same scores: every resample's difference is 0 (an interval needs half the resamples to be valid)
    expected = (0.0, 0.0) if 2 * intervals["valid"] >= intervals["samples"] else (None, None)
    for figure in ("roc_auc", "eer"):
        assert (intervals[figure]["low"], intervals[figure]["high"]) == expected, figure


def test_calibrate_stores_the_val_threshold_on_a_model_without_one_and_never_overwrites(
    settings: Settings, store: BlobStore, johns_dir: Path, mobilefacenet_checkpoint: Path
) -> None:
    world = add_johns(settings, store, johns_dir, mobilefacenet_checkpoint, regression_per_person=2)
    params = {"model": str(world.base_id), "split": "val", "calibrate": True}
    with session_scope(settings.database_url) as session:
        job = add_job(session, "evaluate", params)

    assert run_in_process(settings, job.id).status == "succeeded"
    with session_scope(settings.database_url) as session:
        result = get_job(session, job.id).result
        threshold = session.get(ModelVersion, world.base_id).threshold
        again = add_job(session, "evaluate", params)
    assert result["calibration"] == {"threshold": threshold, "stored": True}
    assert 0.0 < threshold < 1.0
    # the same best-accuracy threshold on val a fine-tune stores with its checkpoint
    assert result["threshold"] == threshold and result["metrics"]["threshold_source"] == "val"
    assert result["metrics"]["at_threshold"]["accuracy"] == result["metrics"]["best_accuracy"]["accuracy"]

    with session_scope(settings.database_url) as session:
        session.execute(update(ModelVersion).where(ModelVersion.id == world.base_id).values(threshold=0.25))
    assert run_in_process(settings, again.id).status == "succeeded"
    with session_scope(settings.database_url) as session:
        second = get_job(session, again.id).result
        assert session.get(ModelVersion, world.base_id).threshold == 0.25, "a threshold is never replaced"
    assert second["calibration"] == {"threshold": threshold, "stored": False}
    assert second["metrics"]["threshold_source"] == "model"


def test_calibrate_refuses_val_without_both_kinds_of_pairs(
    settings: Settings, store: BlobStore, johns_dir: Path, mobilefacenet_checkpoint: Path
) -> None:
    world = add_johns(settings, store, johns_dir, mobilefacenet_checkpoint, regression_per_person=2)
    with session_scope(settings.database_url) as session:
        session.execute(delete(FeedbackPair).where(FeedbackPair.split == "val", FeedbackPair.label == 0))
        same = session.scalar(select(func.count()).where(FeedbackPair.split == "val"))
        job = add_job(session, "evaluate", {"model": str(world.base_id), "split": "val", "calibrate": True})

    assert run_in_process(settings, job.id).status == "failed"
    with session_scope(settings.database_url) as session:
        error = get_job(session, job.id).error
        assert session.get(ModelVersion, world.base_id).threshold is None
    assert same > 0
    assert error["type"] == "not-enough-feedback"
    assert error["detail"] == f"cannot calibrate: val has {same} same and 0 different pairs"
