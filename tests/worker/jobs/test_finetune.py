"""The finetune job in-process against real PostgreSQL, the MobileFaceNet checkpoint and the johns faces."""

import itertools
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.blobs import BlobStore
from app.config import Settings
from app.db import session_scope
from app.tables import Activation, Evaluation, Job, ModelVersion
from tests.worker.factories import (
    add_face,
    add_job,
    add_pair,
    add_ready_base,
    get_job,
    run_in_process,
)
from tests.worker.johns import TRAINED_PEOPLE, add_johns, johns_images
from worker.jobs.data import load_feedback
from worker.runtime import JobContext, Timings


def test_the_api_job_defaults_are_the_trainers_defaults() -> None:
    """The api cannot import the trainer, so it repeats its defaults; they must agree."""
    from app.jobs.params import FinetuneParams
    from worker.jobs.finetune import train_config
    from worker.ml.training import TrainConfig

    assert train_config(FinetuneParams().model_dump(mode="json")) == TrainConfig()
    stored = FinetuneParams().model_dump(mode="json")
    trainer = TrainConfig().to_dict()
    shared = sorted(set(stored) & set(trainer))
    assert "patience" in shared
    assert {key: stored[key] for key in shared} == {key: trainer[key] for key in shared}, (
        "the stored params name the values the trainer uses, not nulls it fills in"
    )
    custom = {
        "margin": 1.0,
        "distill_weight": 0.0,
        "freeze_stem": True,
        "epochs": 3,
        "selection": "interpolate",
        "interpolation": 0.3,
    }
    assert train_config(FinetuneParams(**custom).model_dump(mode="json")) == TrainConfig(**custom)


def _finetune_job(session: Session, base_id: uuid.UUID, **params: Any) -> Job:
    defaults = {
        "base_model": str(base_id),
        "epochs": 2,
        "learning_rate": 1e-4,
        "batch_size": 16,
        "margin": 1.4,
        "seed": 0,
        "auto_promote": True,
        "patience": None,
    }
    return add_job(session, "finetune", defaults | params)


def test_finetune_refuses_to_train_without_train_pairs(
    settings: Settings, store: BlobStore, johns_dir: Path, mobilefacenet_checkpoint: Path
) -> None:
    paths = johns_images(johns_dir, ["John_Savage"], per_person=3)["John_Savage"]
    with session_scope(settings.database_url) as session:
        base = add_ready_base(session, store, mobilefacenet_checkpoint)
        faces = [add_face(session, store, p.read_bytes(), settings) for p in paths]
        for a, b in itertools.combinations(faces, 2):
            add_pair(session, a, b, 1, "regression")
        job = _finetune_job(session, base.id)

    assert run_in_process(settings, job.id).status == "failed"
    with session_scope(settings.database_url) as session:
        error = get_job(session, job.id).error
        assert error["type"] == "not-enough-feedback" and "train" in error["detail"]
        assert session.scalar(select(func.count()).select_from(ModelVersion)) == 1


@pytest.mark.slow
def test_finetune_cancelled_during_training_registers_nothing(
    settings: Settings,
    store: BlobStore,
    johns_dir: Path,
    mobilefacenet_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world = add_johns(settings, store, johns_dir, mobilefacenet_checkpoint, regression_per_person=2)
    with session_scope(settings.database_url) as session:
        job = _finetune_job(session, world.base_id, batch_size=4)
    phases: list[str] = []
    original = JobContext.progress

    def progress(ctx: JobContext, *, force: bool = False, **fields: Any) -> bool:
        phases.append(fields.get("phase"))
        if fields.get("phase") == "train":
            with session_scope(settings.database_url) as session:  # what POST /v1/jobs/{id}/cancel does
                session.execute(update(Job).where(Job.id == ctx.job.id).values(cancel_requested=True))
        return original(ctx, force=force, **fields)

    monkeypatch.setattr(JobContext, "progress", progress)
    eager = Timings(heartbeat_interval_s=5.0, progress_interval_s=0.0, cancel_check_interval_s=0.0)

    assert run_in_process(settings, job.id, eager).status == "cancelled"
    assert phases.count("train") == 1 and "saving" not in phases
    with session_scope(settings.database_url) as session:
        job = get_job(session, job.id)
        assert job.status == "cancelled" and job.progress["phase"] == "train"
        assert session.scalar(select(func.count()).select_from(ModelVersion)) == 1


def _expected_evidence(settings: Settings, session: Session) -> dict[str, dict[str, int]]:
    """What the gate lacks, recomputed from the stored feedback independently of the job's own report."""
    sets = load_feedback(session)
    same = sum(row.label for row in sets.pairs["test"])
    different = len(sets.pairs["test"]) - same
    needed: dict[str, dict[str, int]] = {}
    test = {
        "same": settings.gate_min_test_same - same,
        "different": settings.gate_min_test_different - different,
    }
    if any(n > 0 for n in test.values()):
        needed["test"] = {kind: n for kind, n in test.items() if n > 0}
    regression = len(sets.pairs["regression"])
    if 0 < regression < settings.gate_min_regression_pairs:
        needed["regression"] = {"pairs": settings.gate_min_regression_pairs - regression}
    return needed


@pytest.mark.slow
def test_finetune_registers_a_child_judged_against_its_parent(
    settings: Settings,
    store: BlobStore,
    johns_dir: Path,
    mobilefacenet_checkpoint: Path,
    sent_jobs: list[tuple[uuid.UUID, str]],
) -> None:
    from worker.ml.checkpoints import load_backbone

    world = add_johns(settings, store, johns_dir, mobilefacenet_checkpoint)
    with session_scope(settings.database_url) as session:
        job = _finetune_job(session, world.base_id)

    outcome = run_in_process(settings, job.id)

    assert outcome.status == "succeeded", outcome.error
    with session_scope(settings.database_url) as session:
        job = get_job(session, job.id)
        result = job.result
        child = session.get(ModelVersion, uuid.UUID(result["model_id"]))
        assert child is not None and child.status == "ready"
        assert (child.parent_id, child.created_by_job_id) == (world.base_id, job.id)
        assert child.threshold == result["threshold"] is not None
        assert child.hyperparameters["epochs"] == 2 and child.hyperparameters["margin"] == 1.4
        assert child.dataset_snapshot == result["dataset_snapshot"]
        assert 1 <= result["epochs_run"] <= 2 and len(result["history"]) == result["epochs_run"] + 1

        # the regression people were never trained on
        snapshot = child.dataset_snapshot
        trained_faces = load_feedback(session).faces("train")
        assert snapshot["faces"]["train"] == len(trained_faces)
        assert {world.faces[face] for face in trained_faces} <= set(TRAINED_PEOPLE)
        assert snapshot["excluded_for_regression_faces"]["train"] > 0

        # the checkpoint: MagFace layout, loadable strictly, with its lineage
        loaded = load_backbone(store.path("checkpoints", child.sha256), "mobilefacenet")
        parent = session.get(ModelVersion, world.base_id)
        assert loaded.metadata["parent_sha256"] == parent.sha256
        assert loaded.metadata["threshold"] == child.threshold

        # parent and child scored on the very same pairs
        for name in ("test", "regression"):
            entry = result["evaluations"][name]
            assert entry["parent"]["pairs_sha256"] == entry["candidate"]["pairs_sha256"]
            assert entry["parent"]["pair_count"] == entry["candidate"]["pair_count"] > 0
            rows = session.scalars(
                select(Evaluation).where(Evaluation.job_id == job.id, Evaluation.split == name)
            ).all()
            assert {row.model_id for row in rows} == {world.base_id, child.id}
            assert len({row.pairs_sha256 for row in rows}) == 1
        assert (
            result["evaluations"]["test"]["parent"]["threshold_source"] == "val"
        )  # the base has none stored

        # The johns test split is a few pairs of three people, far below the gate's minimums (20 same and
        # 20 different test pairs): the gate refuses, names what is missing, and nothing is activated. A
        # promotion on real evidence is tests/worker/jobs/test_gate_faces.py.
        decision = result["gate"]
        needed = _expected_evidence(settings, session)
        assert needed, "the johns world is too small for the gate"
        assert result["evidence_report"]["needed"] == needed == decision["evidence"]["needed"]
        assert decision["refusals"][:1] == ["not-enough-evidence"]
        (evidence,) = [check for check in decision["checks"] if check["name"] == "evidence"]
        assert not evidence["passed"] and evidence["reason"].startswith("not-enough-evidence: test needs")
        assert decision["passed"] is False and decision["promoted"] is False
        test_interval = decision["intervals"]["test"]["roc_auc"]
        assert test_interval["low"] <= test_interval["estimate"] <= test_interval["high"]
        assert result["evaluations"]["test"]["intervals"] == decision["intervals"]["test"]
        active = session.scalars(select(Activation).order_by(Activation.created_at.desc()).limit(1)).one()
        assert active.model_id == world.base_id
        assert session.scalars(select(Job).where(Job.kind == "reindex")).all() == []
        assert result["reindex_job_id"] is None and sent_jobs == []


class _WorkerDied(BaseException):
    """Escapes the job runner as a killed worker would: the row stays `running` for the sweeper."""


@pytest.mark.slow
def test_a_finetune_retried_after_its_worker_died_while_evaluating_registers_its_child_once(
    settings: Settings,
    store: BlobStore,
    johns_dir: Path,
    mobilefacenet_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from datetime import UTC, datetime, timedelta

    import worker.jobs.finetune
    from app.jobs.sweeper import sweep_once

    world = add_johns(settings, store, johns_dir, mobilefacenet_checkpoint)
    with session_scope(settings.database_url) as session:
        job = _finetune_job(session, world.base_id, epochs=1)
    trained: list[int] = []
    real_train = worker.jobs.finetune._train

    def train(*args: Any, **kwargs: Any) -> Any:
        trained.append(1)
        return real_train(*args, **kwargs)

    def die(*_args: Any, **_kwargs: Any) -> None:
        raise _WorkerDied

    monkeypatch.setattr(worker.jobs.finetune, "_train", train)
    monkeypatch.setattr(worker.jobs.finetune, "compare_on", die)
    with pytest.raises(_WorkerDied):
        run_in_process(settings, job.id)
    with session_scope(settings.database_url) as session:
        (first,) = session.scalars(select(ModelVersion).where(ModelVersion.created_by_job_id == job.id)).all()
        first_id = first.id
    later = datetime.now(UTC) + timedelta(seconds=settings.job_heartbeat_timeout_s + 60)
    assert sweep_once(settings, now=later).requeued == [job.id]
    monkeypatch.undo()
    monkeypatch.setattr(worker.jobs.finetune, "_train", train)

    outcome = run_in_process(settings, job.id)

    assert outcome.status == "succeeded", outcome.error
    assert trained == [1], "the retry judged the registered child instead of training again"
    with session_scope(settings.database_url) as session:
        children = session.scalars(select(ModelVersion).where(ModelVersion.created_by_job_id == job.id)).all()
        assert [child.id for child in children] == [first_id]
        job = get_job(session, job.id)
        assert (job.attempts, job.result["model_id"]) == (2, str(first_id))
        assert job.result["trained_by_earlier_attempt"] is True
        assert job.result["best_epoch"] in (0, 1) and len(job.result["history"]) == 2
        assert job.result["threshold"] == children[0].threshold


def _digest(tensor: Any) -> str:
    import hashlib

    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


@pytest.mark.slow
def test_finetune_reports_its_phases_and_embeds_nothing_twice_with_the_same_weights(
    settings: Settings,
    store: BlobStore,
    johns_dir: Path,
    mobilefacenet_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every embedding pass outside the training steps is recorded as (weights, image): the parent's
    embeddings (for distillation, epoch 0's validation, its threshold and the evaluation) must each be
    computed once, not once per use."""
    import worker.ml.evaluation
    import worker.ml.training
    from worker.ml.embedding import embed_pixels

    passes: list[tuple[str, str]] = []

    def counted(model: Any, spec: Any, pixels: Any, **kwargs: Any) -> Any:
        weights = "".join(_digest(value) for value in model.state_dict().values())
        passes.extend((weights, _digest(image)) for image in pixels)
        return embed_pixels(model, spec, pixels, **kwargs)

    monkeypatch.setattr(worker.ml.training, "embed_pixels", counted)
    monkeypatch.setattr(worker.ml.evaluation, "embed_pixels", counted)
    world = add_johns(settings, store, johns_dir, mobilefacenet_checkpoint)
    with session_scope(settings.database_url) as session:
        job = _finetune_job(session, world.base_id, epochs=2, patience=5, learning_rate=1e-3)
        train_pairs = len(load_feedback(session).pairs["train"])

    outcome = run_in_process(settings, job.id)

    assert outcome.status == "succeeded", outcome.error
    with session_scope(settings.database_url) as session:
        result = get_job(session, job.id).result
    assert result["best_epoch"] >= 1, "the candidate must differ from its parent for the count to mean much"
    repeated = {key: n for key, n in Counter(passes).items() if n > 1}
    assert passes
    assert not repeated, f"{len(repeated)} (weights, image) embeddings were computed more than once"

    phases = result["phases"]
    assert set(phases) == {"loading", "training", "saving", "evaluating", "gating"}
    assert all(phase["seconds"] >= 0 and phase["cpu_seconds"] >= 0 for phase in phases.values())
    training = phases["training"]
    assert training["epochs"] == result["epochs_run"] == 2
    assert training["pairs"] == 2 * train_pairs > 0
    assert training["seconds"] > 0
    rate = training["pairs"] / training["seconds"]  # pairs_per_s is rounded to 0.01, seconds to 0.1 ms
    assert training["pairs_per_s"] == pytest.approx(rate, rel=1e-3, abs=0.006)
    with session_scope(settings.database_url) as session:
        job_row = get_job(session, job.id)
        wall = (job_row.finished_at - job_row.started_at).total_seconds()
    assert sum(phase["seconds"] for phase in phases.values()) <= wall
