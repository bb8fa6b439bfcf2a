"""The validate_model job against real PostgreSQL and the real MobileFaceNet checkpoint, in-process."""

from pathlib import Path

import pytest

from app.blobs import BlobStore
from app.config import Settings
from app.db import session_scope
from app.tables import ModelVersion
from tests.worker.factories import add_job, add_model, get_job, run_in_process
from worker.ml.preprocessing import preprocess_spec_for


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
        job = get_job(session, job.id)
        assert job.status == "succeeded"
        assert job.result["embedding_size"] == 128 and job.result["model_id"] == str(model.id)


def test_validate_model_marks_a_checkpoint_of_another_architecture_invalid(
    settings: Settings, store: BlobStore, mobilefacenet_checkpoint: Path
) -> None:
    with session_scope(settings.database_url) as session:
        model = add_model(session, store, mobilefacenet_checkpoint, "iresnet18")
        job = add_job(session, "validate_model", {"model": str(model.id)})

    outcome = run_in_process(settings, job.id)

    assert outcome.status == "failed"
    with session_scope(settings.database_url) as session:
        model = session.get(ModelVersion, model.id)
        assert model.status == "invalid"
        assert "iresnet18" in model.status_reason and "mobilefacenet" in model.status_reason
        job = get_job(session, job.id)
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

    assert run_in_process(settings, job.id).status == "failed"
    with session_scope(settings.database_url) as session:
        model = session.get(ModelVersion, model.id)
        assert model.status == "invalid" and model.status_reason
        assert get_job(session, job.id).error["type"] == "invalid-checkpoint"


def test_a_checkpoint_the_strict_load_refuses_keeps_no_bytes(
    settings: Settings, store: BlobStore, mobilefacenet_checkpoint: Path
) -> None:
    with session_scope(settings.database_url) as session:
        model = add_model(session, store, mobilefacenet_checkpoint, "iresnet18")
        job = add_job(session, "validate_model", {"model": str(model.id)})
    assert store.exists("checkpoints", model.sha256)

    assert run_in_process(settings, job.id).status == "failed"

    assert not store.exists("checkpoints", model.sha256)
    with session_scope(settings.database_url) as session:
        assert session.get(ModelVersion, model.id).status == "invalid"


def test_a_refused_checkpoint_keeps_its_bytes_while_another_model_needs_them(
    settings: Settings, store: BlobStore, mobilefacenet_checkpoint: Path
) -> None:
    """The same bytes registered under the right architecture too: that model still loads them."""
    with session_scope(settings.database_url) as session:
        wrong = add_model(session, store, mobilefacenet_checkpoint, "iresnet18")
        right = add_model(session, store, mobilefacenet_checkpoint, "mobilefacenet")
        job = add_job(session, "validate_model", {"model": str(wrong.id)})

    assert run_in_process(settings, job.id).status == "failed"

    assert store.exists("checkpoints", right.sha256)
