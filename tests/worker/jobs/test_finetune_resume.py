"""A retried fine-tune goes on from its last epoch instead of training again; an outage hands it back.

In-process on real PostgreSQL with the shared MobileFaceNet, on a handful of johns faces with their pairs'
splits set by hand, so that a whole job takes seconds.
"""

import itertools
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import worker.jobs.finetune
from app.blobs import BlobStore, StorageUnavailable
from app.config import Settings
from app.db import session_scope
from app.jobs.sweeper import sweep_once
from app.jobs.training_states import state_path
from tests.worker.factories import add_face, add_job, add_pair, add_ready_base, get_job, run_in_process
from tests.worker.johns import johns_images
from worker.runtime import JobContext

PEOPLE = ("John_Salley", "John_Simm")
PARAMS = {
    "epochs": 2,
    "batch_size": 8,
    "seed": 0,
    "auto_promote": False,
    "patience": None,
    "freeze_stem": True,
}


class _WorkerDied(BaseException):
    """Escapes the job runner as a killed worker would: the row stays `running` for the sweeper."""


def _small_world(settings: Settings, store: BlobStore, johns_dir: Path, checkpoint: Path) -> uuid.UUID:
    """Two train and two val faces of each of two people, every pair among each group labelled: one step an
    epoch."""
    images = johns_images(johns_dir, PEOPLE, per_person=4)
    with session_scope(settings.database_url) as session:
        base = add_ready_base(session, store, checkpoint)
        groups: dict[str, list[tuple[Any, str]]] = {"train": [], "val": []}
        for person, paths in images.items():
            for index, path in enumerate(paths):
                face = add_face(session, store, path.read_bytes(), settings, subject=person)
                groups["train" if index < 2 else "val"].append((face, person))
        for split, faces in groups.items():
            for (a, who_a), (b, who_b) in itertools.combinations(faces, 2):
                add_pair(session, a, b, int(who_a == who_b), split)
        return base.id


def _finetune(settings: Settings, base_id: uuid.UUID, **params: Any) -> uuid.UUID:
    with session_scope(settings.database_url) as session:
        return add_job(session, "finetune", {"base_model": str(base_id), **PARAMS, **params}).id


def _trained_epochs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The epochs whose training steps the job reports, in order."""
    seen: list[int] = []
    original = JobContext.progress

    def progress(ctx: JobContext, *, force: bool = False, **fields: Any) -> bool:
        if fields.get("phase") == "train" and fields["epoch"] not in seen:
            seen.append(fields["epoch"])
        return original(ctx, force=force, **fields)

    monkeypatch.setattr(JobContext, "progress", progress)
    return seen


@pytest.fixture
def world(settings: Settings, store: BlobStore, johns_dir: Path, mobilefacenet_checkpoint: Path) -> uuid.UUID:
    return _small_world(settings, store, johns_dir, mobilefacenet_checkpoint)


@pytest.mark.slow
def test_a_finetune_killed_after_epoch_1_resumes_at_epoch_2_and_ends_as_an_uninterrupted_one(
    settings: Settings, world: uuid.UUID, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = worker.jobs.finetune.save_state

    def save_then_die(ctx: JobContext, state: Any, start: str) -> None:
        real_save(ctx, state, start)
        raise _WorkerDied

    job_id = _finetune(settings, world)
    monkeypatch.setattr(worker.jobs.finetune, "save_state", save_then_die)
    with pytest.raises(_WorkerDied):
        run_in_process(settings, job_id)
    assert state_path(settings, job_id).is_file(), "epoch 1 was saved before the worker died"
    later = datetime.now(UTC) + timedelta(seconds=settings.job_heartbeat_timeout_s + 60)
    assert sweep_once(settings, now=later).requeued == [job_id]
    assert state_path(settings, job_id).is_file(), "the sweeper keeps the state of a job it retries"
    monkeypatch.undo()
    epochs = _trained_epochs(monkeypatch)

    assert run_in_process(settings, job_id).status == "succeeded"
    assert epochs == [2]
    assert not state_path(settings, job_id).exists(), "the state is removed when the job ends"
    reference_id = _finetune(settings, world)
    assert run_in_process(settings, reference_id).status == "succeeded"
    with session_scope(settings.database_url) as session:
        resumed, reference = get_job(session, job_id).result, get_job(session, reference_id).result
    assert (resumed["resumed_after_epoch"], reference["resumed_after_epoch"]) == (1, 0)
    for key in ("history", "best_epoch", "threshold", "evaluations"):
        assert resumed[key] == reference[key], key


@pytest.mark.slow
def test_a_storage_outage_while_saving_the_model_queues_the_job_again_to_resume(
    settings: Settings, world: uuid.UUID, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.runtime

    sent: list[uuid.UUID] = []
    monkeypatch.setattr(worker.runtime, "try_enqueue_job", lambda _s, job_id, _kind: sent.append(job_id))

    def full_disk(*_args: Any, **_kwargs: Any) -> None:
        raise StorageUnavailable("the blob store could not write: No space left on device")

    job_id = _finetune(settings, world, distill_weight=0.0, epochs=1)
    monkeypatch.setattr(worker.jobs.finetune, "_store_checkpoint", full_disk)
    assert run_in_process(settings, job_id).status == "queued"
    with session_scope(settings.database_url) as session:
        job = get_job(session, job_id)
        assert (job.status, job.attempts, job.progress, job.error) == ("queued", 1, None, None)
    assert sent == [job_id], "the job was sent again, as the sweeper would after a worker died"
    assert state_path(settings, job_id).is_file()
    monkeypatch.undo()
    epochs = _trained_epochs(monkeypatch)

    assert run_in_process(settings, job_id).status == "succeeded"
    assert epochs == [], "the epoch was trained by the first attempt"
    with session_scope(settings.database_url) as session:
        job = get_job(session, job_id)
        assert (job.attempts, job.result["resumed_after_epoch"]) == (2, 1)
        assert [record["epoch"] for record in job.result["history"]] == [0, 1]
    assert not state_path(settings, job_id).exists()
