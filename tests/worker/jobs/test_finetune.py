"""Job handlers against real PostgreSQL, the real MobileFaceNet checkpoint and the johns faces, in-process."""

import hashlib
import itertools
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.blobs import BlobStore
from app.config import Settings
from app.db import session_scope
from app.splits import split_for_digest
from app.tables import Activation, Evaluation, Face, FaceEmbedding, FeedbackPair, Job, ModelVersion
from tests.worker.factories import add_face, add_job, add_model, add_pair
from tests.worker.johns import johns_images, johns_labels
from worker.jobs import gate
from worker.jobs.data import load_feedback
from worker.ml.preprocessing import preprocess_spec_for
from worker.runtime import JobContext, Outcome, Timings, run_job

TRAINED_PEOPLE = ("John_Salley", "John_Schneider", "John_Simm")
REGRESSION_PEOPLE = ("John_Savage", "John_Shimkus")
TIMINGS = Timings(heartbeat_interval_s=5.0, progress_interval_s=0.1, cancel_check_interval_s=0.5)


@dataclass
class Johns:
    """Faces of three people fed back for training, and of two others forming the regression set."""

    base_id: uuid.UUID
    faces: dict[uuid.UUID, str] = field(default_factory=dict)  # face id → person
    regression_faces: set[uuid.UUID] = field(default_factory=set)


def _run(settings: Settings, job_id: uuid.UUID, timings: Timings = TIMINGS) -> Outcome:
    outcome = run_job(job_id, settings=settings, worker_name="test-worker", timings=timings)
    assert outcome is not None
    return outcome


def _job(session: Session, job_id: uuid.UUID) -> Job:
    job = session.get(Job, job_id)
    assert job is not None
    return job


def _ready_base(
    session: Session, store: BlobStore, checkpoint: Path, threshold: float | None = None
) -> ModelVersion:
    model = add_model(
        session, store, checkpoint, "mobilefacenet", status="ready", threshold=threshold, name="base"
    )
    model.embedding_size = 128
    model.preprocess = preprocess_spec_for("mobilefacenet").to_dict()
    return model


def _johns(
    settings: Settings,
    store: BlobStore,
    johns_dir: Path,
    checkpoint: Path,
    *,
    regression_per_person: int = 6,
    train_per_person: int = 4,
) -> Johns:
    """Upload the faces, post every labelled pair among them (the regression people's pairs as regression),
    register and activate the base model. Every val and test face of the trained people is kept; their train
    faces are capped at `train_per_person` so that a fine-tune stays short."""
    labels = johns_labels(johns_dir)
    images = johns_images(johns_dir, TRAINED_PEOPLE) | johns_images(
        johns_dir, REGRESSION_PEOPLE, per_person=regression_per_person
    )
    with session_scope(settings.database_url) as session:
        base = _ready_base(session, store, checkpoint)
        session.add(Activation(model_id=base.id, actor="test", reason="base"))
        world = Johns(base_id=base.id)
        faces: list[Face] = []
        seen: set[str] = set()
        for person, paths in images.items():
            trained = 0
            for path in paths:
                data = path.read_bytes()
                digest = hashlib.sha256(data).hexdigest()
                if digest in seen:
                    continue  # the same photo twice (johns has one): the api keeps one face for it
                if person in TRAINED_PEOPLE and split_for_digest(digest, settings.split_fractions) == "train":
                    if trained == train_per_person:
                        continue
                    trained += 1
                face = add_face(session, store, data, settings, subject=person)
                seen.add(face.sha256)
                faces.append(face)
                world.faces[face.id] = person
                if person in REGRESSION_PEOPLE:
                    world.regression_faces.add(face.id)
        for a, b in itertools.combinations(faces, 2):
            label = labels[frozenset((a.sha256, b.sha256))]
            both_regression = a.id in world.regression_faces and b.id in world.regression_faces
            add_pair(session, a, b, label, "regression" if both_regression else None)
    return world


# --- validate_model ---------------------------------------------------------------------------------------


def test_the_api_job_defaults_are_the_trainers_defaults() -> None:
    """The api cannot import the trainer, so it repeats its defaults; they must agree."""
    from app.jobs.params import FinetuneParams
    from worker.jobs.finetune import train_config
    from worker.ml.training import TrainConfig

    assert train_config(FinetuneParams().model_dump(mode="json")) == TrainConfig()
    custom = {"margin": 1.0, "distill_weight": 0.0, "freeze_stem": True, "epochs": 3}
    assert train_config(FinetuneParams(**custom).model_dump(mode="json")) == TrainConfig(**custom)


def test_validate_model_makes_the_real_checkpoint_ready(
    settings: Settings, store: BlobStore, mobilefacenet_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.tasks

    with session_scope(settings.database_url) as session:
        model = add_model(session, store, mobilefacenet_checkpoint, "mobilefacenet")
        job = add_job(session, "validate_model", {"model": str(model.id)})
    monkeypatch.setattr(worker.tasks, "get_settings", lambda: settings)

    assert worker.tasks.validate_model(str(job.id)) == "succeeded"  # the Celery task, run in-process

    with session_scope(settings.database_url) as session:
        model = session.get(ModelVersion, model.id)
        assert (model.status, model.embedding_size, model.status_reason) == ("ready", 128, None)
        assert model.preprocess == preprocess_spec_for("mobilefacenet").to_dict()
        assert model.validated_at is not None
        job = _job(session, job.id)
        assert job.status == "succeeded"
        assert job.result["embedding_size"] == 128 and job.result["model_id"] == str(model.id)


def test_validate_model_marks_a_checkpoint_of_another_architecture_invalid(
    settings: Settings, store: BlobStore, mobilefacenet_checkpoint: Path
) -> None:
    with session_scope(settings.database_url) as session:
        model = add_model(session, store, mobilefacenet_checkpoint, "iresnet18")
        job = add_job(session, "validate_model", {"model": str(model.id)})

    outcome = _run(settings, job.id)

    assert outcome.status == "failed"
    with session_scope(settings.database_url) as session:
        model = session.get(ModelVersion, model.id)
        assert model.status == "invalid"
        assert "iresnet18" in model.status_reason and "mobilefacenet" in model.status_reason
        job = _job(session, job.id)
        assert job.error["type"] == "invalid-checkpoint"
        assert "mobilefacenet" in job.error["detail"]


def test_validate_model_marks_a_file_that_is_no_checkpoint_invalid(
    settings: Settings, store: BlobStore, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint" * 10)
    with session_scope(settings.database_url) as session:
        model = add_model(session, store, junk, "iresnet50")
        job = add_job(session, "validate_model", {"model": str(model.id)})

    assert _run(settings, job.id).status == "failed"
    with session_scope(settings.database_url) as session:
        model = session.get(ModelVersion, model.id)
        assert model.status == "invalid" and model.status_reason
        assert _job(session, job.id).error["type"] == "invalid-checkpoint"


# --- data and gate ------------------------------------------------------------------------------------------


def test_regression_faces_are_kept_out_of_training_and_judging(
    settings: Settings, store: BlobStore, johns_dir: Path, mobilefacenet_checkpoint: Path
) -> None:
    world = _johns(settings, store, johns_dir, mobilefacenet_checkpoint, regression_per_person=4)
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


def _metrics(auc: float | None, eer: float | None) -> dict[str, Any]:
    return {"roc_auc": auc, "eer": eer, "counts": {"pairs": 10}}


@pytest.mark.parametrize(
    ("test", "regression", "best_epoch", "passed", "failing"),
    [
        ((_metrics(0.95, 0.10), _metrics(0.97, 0.08)), None, 2, True, []),
        (
            (_metrics(0.95, 0.10), _metrics(0.95, 0.10)),
            (_metrics(0.990, 0.02), _metrics(0.9885, 0.03)),
            1,
            True,
            [],
        ),
        ((_metrics(0.95, 0.10), _metrics(0.94, 0.08)), None, 2, False, ["test_auc"]),
        ((_metrics(0.95, 0.10), _metrics(0.96, 0.12)), None, 2, False, ["test_eer"]),
        (
            (_metrics(0.95, 0.10), _metrics(0.97, 0.08)),
            (_metrics(0.990, 0.02), _metrics(0.987, 0.02)),
            2,
            False,
            ["regression_auc"],
        ),
        ((_metrics(None, None), _metrics(None, None)), None, 2, False, ["test_auc", "test_eer"]),
        (
            (_metrics(0.95, 0.10), _metrics(0.97, 0.08)),
            (_metrics(None, None), _metrics(0.99, None)),
            2,
            False,
            ["regression_auc"],
        ),
        ((_metrics(0.95, 0.10), _metrics(0.95, 0.10)), None, 0, False, ["improved_on_val"]),
    ],
)
def test_the_gate(
    test: tuple[dict, dict],
    regression: tuple[dict, dict] | None,
    best_epoch: int,
    passed: bool,
    failing: list[str],
) -> None:
    decision = gate.decide(test, regression, regression_auc_tolerance=0.002, best_epoch=best_epoch)
    assert decision.passed is passed
    assert [c.name for c in decision.checks if not c.passed] == failing
    assert len(decision.reasons) >= len(decision.checks)
    summary = decision.to_dict()
    assert summary["passed"] is passed and summary["promoted"] is False
    assert (summary["regression"] is None) == (regression is None)


# --- finetune -----------------------------------------------------------------------------------------------


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
        base = _ready_base(session, store, mobilefacenet_checkpoint)
        faces = [add_face(session, store, p.read_bytes(), settings) for p in paths]
        for a, b in itertools.combinations(faces, 2):
            add_pair(session, a, b, 1, "regression")
        job = _finetune_job(session, base.id)

    assert _run(settings, job.id).status == "failed"
    with session_scope(settings.database_url) as session:
        error = _job(session, job.id).error
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
    world = _johns(settings, store, johns_dir, mobilefacenet_checkpoint, regression_per_person=2)
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

    assert _run(settings, job.id, eager).status == "cancelled"
    assert phases.count("train") == 1 and "saving" not in phases
    with session_scope(settings.database_url) as session:
        job = _job(session, job.id)
        assert job.status == "cancelled" and job.progress["phase"] == "train"
        assert session.scalar(select(func.count()).select_from(ModelVersion)) == 1


def _expected_gate(job: Job, settings: Settings, session: Session) -> bool:
    """The gate recomputed from the stored Evaluation rows, independently of the job's own decision."""
    rows = session.scalars(select(Evaluation).where(Evaluation.job_id == job.id)).all()
    by = {(row.split, row.model_id): row.metrics for row in rows}
    parent, child = uuid.UUID(job.result["parent_id"]), uuid.UUID(job.result["model_id"])
    test_ok = (
        by[("test", child)]["roc_auc"] >= by[("test", parent)]["roc_auc"]
        and by[("test", child)]["eer"] <= by[("test", parent)]["eer"]
    )
    regression_ok = (
        by[("regression", child)]["roc_auc"]
        >= by[("regression", parent)]["roc_auc"] - settings.regression_auc_tolerance
    )
    return test_ok and regression_ok and job.result["best_epoch"] > 0


@pytest.mark.slow
def test_finetune_registers_a_child_judged_against_its_parent(
    settings: Settings,
    store: BlobStore,
    johns_dir: Path,
    mobilefacenet_checkpoint: Path,
    sent_jobs: list[tuple[uuid.UUID, str]],
) -> None:
    from worker.ml.checkpoints import load_backbone

    world = _johns(settings, store, johns_dir, mobilefacenet_checkpoint)
    with session_scope(settings.database_url) as session:
        job = _finetune_job(session, world.base_id)

    outcome = _run(settings, job.id)

    assert outcome.status == "succeeded", outcome.error
    with session_scope(settings.database_url) as session:
        job = _job(session, job.id)
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

        decision = result["gate"]
        assert decision["passed"] is _expected_gate(job, settings, session)
        assert decision["promoted"] is decision["passed"]
        active = session.scalars(select(Activation).order_by(Activation.created_at.desc()).limit(1)).one()
        reindex_jobs = session.scalars(select(Job).where(Job.kind == "reindex")).all()
        if decision["promoted"]:
            assert (active.model_id, active.previous_model_id) == (child.id, world.base_id)
            assert active.job_id == job.id
            (reindex,) = reindex_jobs
            assert (reindex.status, reindex.parent_job_id) == ("queued", job.id)
            assert reindex.params["model"] == str(child.id)
            assert result["reindex_job_id"] == str(reindex.id)
            assert (reindex.id, "reindex") in sent_jobs
        else:
            assert active.model_id == world.base_id
            assert reindex_jobs == [] and result["reindex_job_id"] is None
    if decision["promoted"]:  # the queued reindex embeds every face with the new model
        assert _run(settings, reindex.id).status == "succeeded"
        with session_scope(settings.database_url) as session:
            embedded = session.scalar(
                select(func.count()).select_from(FaceEmbedding).where(FaceEmbedding.model_id == child.id)
            )
        assert embedded == len(world.faces)


# --- evaluate and reindex -----------------------------------------------------------------------------------


def test_evaluate_scores_a_split_and_compares_two_models_on_the_same_pairs(
    settings: Settings, store: BlobStore, johns_dir: Path, mobilefacenet_checkpoint: Path
) -> None:
    world = _johns(settings, store, johns_dir, mobilefacenet_checkpoint, regression_per_person=3)
    with session_scope(settings.database_url) as session:
        other = _ready_base(session, store, mobilefacenet_checkpoint, threshold=0.4)
        job = add_job(
            session, "evaluate", {"model": str(world.base_id), "split": "test", "compare_to": str(other.id)}
        )

    assert _run(settings, job.id).status == "succeeded"
    with session_scope(settings.database_url) as session:
        result = _job(session, job.id).result
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


def test_reindex_embeds_every_face_and_leaves_other_models_alone(
    settings: Settings, store: BlobStore, johns_dir: Path, mobilefacenet_checkpoint: Path
) -> None:
    settings.reindex_batch_size = 4
    paths = johns_images(johns_dir, ["John_Simm", "John_Salley"], per_person=5)
    with session_scope(settings.database_url) as session:
        base = _ready_base(session, store, mobilefacenet_checkpoint)
        older = _ready_base(session, store, mobilefacenet_checkpoint)
        faces = [
            add_face(session, store, p.read_bytes(), settings) for group in paths.values() for p in group
        ]
        broken = add_face(session, store, paths["John_Simm"][0].read_bytes()[:300], settings)
        session.add(FaceEmbedding(face_id=faces[0].id, model_id=older.id, vector=b"\0" * 512, quality=1.0))
        job = add_job(session, "reindex", {"model": str(base.id)})

    assert _run(settings, job.id).status == "succeeded"
    with session_scope(settings.database_url) as session:
        job = _job(session, job.id)
        assert job.result["faces"] == len(faces) + 1
        assert (job.result["embedded"], job.result["skipped"]) == (len(faces), 1)
        assert job.progress["step"] == job.progress["steps"] == 3
        rows = session.scalars(select(FaceEmbedding).where(FaceEmbedding.model_id == base.id)).all()
        assert {row.face_id for row in rows} == {face.id for face in faces}
        assert broken.id not in {row.face_id for row in rows}
        vectors = np.stack([np.frombuffer(row.vector, dtype=np.float32) for row in rows])
        assert vectors.shape == (len(faces), 128)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        assert all(row.quality > 0 for row in rows)
        assert session.get(FaceEmbedding, (faces[0].id, older.id)) is not None
