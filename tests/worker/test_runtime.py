"""The job lifecycle on the worker: claiming, ownership, progress, heartbeat, cancellation, outcomes."""

import errno
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from app.config import Settings
from app.db import session_scope
from app.tables import Job
from tests.conftest import REPO_ROOT
from tests.worker.factories import add_job
from worker.runtime import (
    ClaimedJob,
    JobCancelled,
    JobContext,
    JobFailed,
    Timings,
    claim_job,
    finish_job,
    run_job,
)

FAST = Timings(heartbeat_interval_s=60.0, progress_interval_s=0.0, cancel_check_interval_s=0.0)


def _queued(settings: Settings, kind: str = "evaluate", **fields: Any) -> uuid.UUID:
    with session_scope(settings.database_url) as session:
        return add_job(session, kind, {"model": str(uuid.uuid4())}, **fields).id


def _job(settings: Settings, job_id: uuid.UUID) -> Job:
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def _set(settings: Settings, job_id: uuid.UUID, **values: Any) -> None:
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def _claim(settings: Settings, job_id: uuid.UUID, worker: str = "w1") -> ClaimedJob | None:
    with session_scope(settings.database_url) as session:
        return claim_job(session, job_id, worker)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_two_concurrent_claims_have_one_winner(settings: Settings) -> None:
    job_id = _queued(settings)
    barrier = threading.Barrier(2)
    results: dict[str, ClaimedJob | None] = {}

    def claim(worker: str) -> None:
        with session_scope(settings.database_url) as session:
            barrier.wait()
            results[worker] = claim_job(session, job_id, worker)

    threads = [threading.Thread(target=claim, args=(name,)) for name in ("w1", "w2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    winners = [name for name, claimed in results.items() if claimed is not None]
    assert len(winners) == 1
    job = _job(settings, job_id)
    assert (job.status, job.attempts, job.worker) == ("running", 1, winners[0])
    assert job.started_at is not None and job.heartbeat_at is not None
    assert results[winners[0]].attempt == 1


def test_claim_refuses_a_job_that_is_not_queued(settings: Settings) -> None:
    job_id = _queued(settings)
    assert _claim(settings, job_id, "w1") is not None
    assert _claim(settings, job_id, "w2") is None
    assert _job(settings, job_id).worker == "w1"


def test_claim_refuses_a_cancelled_job(settings: Settings) -> None:
    cancelled = _queued(settings, status="cancelled", cancel_requested=True)
    assert _claim(settings, cancelled) is None
    assert (_job(settings, cancelled).status, _job(settings, cancelled).attempts) == ("cancelled", 0)

    flagged = _queued(settings, cancel_requested=True)  # cancel requested while still queued
    assert _claim(settings, flagged) is None
    job = _job(settings, flagged)
    assert (job.status, job.attempts) == ("cancelled", 0)
    assert job.finished_at is not None


def test_claim_fails_a_job_without_attempts_left(settings: Settings) -> None:
    job_id = _queued(settings, attempts=3)
    assert _claim(settings, job_id) is None
    job = _job(settings, job_id)
    assert job.status == "failed"
    assert job.error["type"] == "attempts-exhausted"


def test_claim_ignores_unknown_and_malformed_ids(settings: Settings) -> None:
    assert _claim(settings, uuid.uuid4()) is None
    assert _claim(settings, "not-a-uuid") is None


def test_a_stale_attempt_cannot_overwrite_the_new_one(settings: Settings) -> None:
    job_id = _queued(settings)
    first = _claim(settings, job_id, "old")
    assert first is not None
    _set(settings, job_id, status="queued")  # the sweeper gave up on the silent first attempt
    second = _claim(settings, job_id, "new")
    assert second is not None and second.attempt == 2

    from app.db import get_engine

    engine = get_engine(settings.database_url)
    assert finish_job(engine, first, "succeeded", result={"stale": True}) is False
    stale = JobContext(first, settings, timings=FAST)
    stale.progress(phase="train", step=9)
    assert stale.should_cancel() is True  # the old attempt learns it lost the row

    job = _job(settings, job_id)
    assert (job.status, job.attempts, job.worker, job.result, job.progress) == (
        "running",
        2,
        "new",
        None,
        None,
    )
    assert finish_job(engine, second, "succeeded", result={"fresh": True}) is True
    job = _job(settings, job_id)
    assert (job.status, job.result) == ("succeeded", {"fresh": True})


def test_progress_is_throttled_but_forced_writes_and_heartbeats_go_through(settings: Settings) -> None:
    job_id = _queued(settings)
    claimed = _claim(settings, job_id)
    assert claimed is not None
    clock = FakeClock()
    ctx = JobContext(claimed, settings, timings=Timings(60.0, progress_interval_s=1.0), clock=clock)

    assert ctx.progress(phase="train", step=1) is True
    clock.now = 0.2
    assert ctx.progress(phase="train", step=2) is False
    assert _job(settings, job_id).progress == {"phase": "train", "step": 1}
    clock.now = 0.3
    assert ctx.progress(phase="epoch", step=3, force=True) is True
    assert _job(settings, job_id).progress == {"phase": "epoch", "step": 3}
    clock.now = 0.5
    assert ctx.progress(phase="train", step=4) is False
    ctx.heartbeat()  # carries the held-back update
    assert _job(settings, job_id).progress == {"phase": "train", "step": 4}
    clock.now = 1.6
    assert ctx.progress(phase="train", step=5) is True
    assert ctx.progress_writes == 4


def test_cancellation_stops_the_handler_between_steps(settings: Settings) -> None:
    job_id = _queued(settings)
    steps: list[int] = []

    def handler(ctx: JobContext) -> dict[str, Any]:
        for step in range(1, 11):
            ctx.raise_if_cancelled(f"before step {step}")
            steps.append(step)
            if step == 3:
                _set(settings, job_id, cancel_requested=True)  # what POST /v1/jobs/{id}/cancel does
        return {"steps": len(steps)}

    outcome = run_job(job_id, settings=settings, worker_name="w", handler=handler, timings=FAST)
    assert outcome is not None and outcome.status == "cancelled"
    assert steps == [1, 2, 3]
    job = _job(settings, job_id)
    assert job.status == "cancelled"
    assert job.result is None and job.finished_at is not None


def test_should_cancel_reads_the_flag_at_most_once_per_interval(settings: Settings) -> None:
    job_id = _queued(settings)
    claimed = _claim(settings, job_id)
    assert claimed is not None
    clock = FakeClock()
    ctx = JobContext(claimed, settings, timings=Timings(60.0, cancel_check_interval_s=1.0), clock=clock)
    assert ctx.should_cancel() is False
    _set(settings, job_id, cancel_requested=True)
    clock.now = 0.5
    assert ctx.should_cancel() is False  # not read again yet
    clock.now = 1.2
    assert ctx.should_cancel() is True


def _run_with(settings: Settings, handler: Callable[[JobContext], Any], kind: str = "evaluate") -> Job:
    job_id = _queued(settings, kind=kind)
    run_job(job_id, settings=settings, worker_name="w", handler=handler, timings=FAST)
    return _job(settings, job_id)


def test_a_successful_handler_stores_its_result_and_last_progress(settings: Settings) -> None:
    def handler(ctx: JobContext) -> dict[str, Any]:
        ctx.progress(phase="done", step=2, steps=2)
        return {"answer": 42}

    job = _run_with(settings, handler)
    assert (job.status, job.result, job.error) == ("succeeded", {"answer": 42}, None)
    assert job.progress == {"phase": "done", "step": 2, "steps": 2}
    assert job.finished_at is not None and job.finished_at >= job.started_at


def test_a_succeeded_job_says_done_in_its_progress_keeping_its_other_fields(settings: Settings) -> None:
    def handler(ctx: JobContext) -> dict[str, Any]:
        ctx.progress(phase="gating", epoch=3, epochs=3, loss=0.25)
        return {"promoted": False}

    job = _run_with(settings, handler)
    assert job.status == "succeeded"
    assert job.progress == {"phase": "done", "epoch": 3, "epochs": 3, "loss": 0.25}


def test_a_succeeded_job_that_reported_no_progress_says_done(settings: Settings) -> None:
    job = _run_with(settings, lambda _ctx: {})
    assert (job.status, job.progress) == ("succeeded", {"phase": "done"})


def test_a_failed_job_keeps_the_phase_it_stopped_in(settings: Settings) -> None:
    def handler(ctx: JobContext) -> dict[str, Any]:
        ctx.progress(phase="train", epoch=1)
        raise JobFailed("not-enough-feedback", "Not enough feedback", "no val pairs")

    job = _run_with(settings, handler)
    assert (job.status, job.progress) == ("failed", {"phase": "train", "epoch": 1})


@pytest.mark.parametrize(
    ("exception", "expected_type", "detail_part"),
    [
        (
            JobFailed("not-enough-feedback", "Not enough feedback", "no train pairs"),
            "not-enough-feedback",
            "no train",
        ),
        (RuntimeError("disk on fire"), "internal-error", "disk on fire"),
        (SoftTimeLimitExceeded(), "time-limit", "time limit"),
    ],
)
def test_handler_errors_fail_the_job_with_a_typed_error(
    settings: Settings, exception: Exception, expected_type: str, detail_part: str
) -> None:
    def handler(_ctx: JobContext) -> dict[str, Any]:
        raise exception

    job = _run_with(settings, handler)
    assert job.status == "failed"
    assert job.error["type"] == expected_type
    assert detail_part in job.error["detail"]
    assert job.error["title"]


def test_a_cancelled_handler_is_recorded_as_cancelled(settings: Settings) -> None:
    def handler(_ctx: JobContext) -> dict[str, Any]:
        raise JobCancelled("cancelled in epoch 2")

    job = _run_with(settings, handler)
    assert job.status == "cancelled"


def test_a_job_of_another_kind_is_not_run_by_the_wrong_task(settings: Settings) -> None:
    ran: list[bool] = []
    job_id = _queued(settings, kind="reindex")
    outcome = run_job(
        job_id,
        settings=settings,
        worker_name="w",
        handler=lambda _ctx: ran.append(True) or {},
        expected_kind="finetune",
    )
    assert outcome is not None and outcome.status == "failed"
    assert not ran
    assert _job(settings, job_id).error["type"] == "wrong-kind"


def test_the_heartbeat_thread_beats_while_a_long_step_runs(settings: Settings) -> None:
    job_id = _queued(settings)
    beats: list[Any] = []

    def handler(ctx: JobContext) -> dict[str, Any]:
        started = _job(settings, job_id).heartbeat_at
        for _ in range(500):  # one long "step" that never reports progress itself
            heartbeat = _job(settings, job_id).heartbeat_at
            if heartbeat > started:
                beats.append(heartbeat)
                break
            threading.Event().wait(0.02)
        return {}

    timings = Timings(heartbeat_interval_s=0.05, progress_interval_s=0.0, cancel_check_interval_s=0.0)
    run_job(job_id, settings=settings, worker_name="w", handler=handler, timings=timings)
    assert beats, "heartbeat_at never moved while the handler ran"


def test_the_tasks_are_registered_and_the_parent_never_imports_torch() -> None:
    script = (
        "import sys\n"
        "from worker.celery_app import celery_app\n"
        "import worker.tasks\n"
        "names = sorted(n for n in celery_app.tasks if n.startswith('magtune.'))\n"
        "print(names)\n"
        "print(celery_app.conf.task_default_queue, celery_app.conf.task_acks_late)\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('worker.ml')))\n"
        "print(celery_app.amqp.router.route({}, 'magtune.embed')['queue'].name)\n"
    )
    output = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    kinds = [
        "magtune.embed",
        "magtune.evaluate",
        "magtune.finetune",
        "magtune.reindex",
        "magtune.validate_model",
    ]
    assert output[0] == str(sorted([*kinds, "magtune.reindex_chunk"]))
    assert output[1] == "gpu True"
    assert output[2] == "[]"
    assert output[3] == "embed", "a worker that sends an embed task routes it as the api does"


def test_an_end_whose_write_meets_a_database_outage_is_written_once_the_database_answers(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.runtime

    real_finish = worker.runtime.finish_job
    calls: list[str] = []
    waits: list[float] = []

    def finish_while_down(*args: Any, **kwargs: Any) -> bool:
        calls.append(args[2])
        if len(calls) < 3:
            raise OperationalError("UPDATE jobs", {}, Exception("server closed the connection unexpectedly"))
        return real_finish(*args, **kwargs)

    monkeypatch.setattr(worker.runtime, "finish_job", finish_while_down)
    monkeypatch.setattr(worker.runtime.time, "sleep", waits.append)
    job = _run_with(settings, lambda _ctx: {"answer": 42})

    assert (job.status, job.result) == ("succeeded", {"answer": 42})
    assert calls == ["succeeded"] * 3 and waits == [1.0, 2.0]


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "storage-unavailable"),
        (OperationalError("INSERT INTO models", {}, Exception("the database system is starting up")), None),
    ],
)
def test_an_outage_in_the_handler_queues_the_job_again_while_it_has_attempts(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, error: Exception, kind: str | None
) -> None:
    import worker.runtime

    sent: list[uuid.UUID] = []
    monkeypatch.setattr(worker.runtime, "try_enqueue_job", lambda _s, job_id, _kind: sent.append(job_id))

    def handler(ctx: JobContext) -> dict[str, Any]:
        ctx.progress(phase="saving")
        raise error

    job_id = _queued(settings, max_attempts=2)
    outcomes = [run_job(job_id, settings=settings, worker_name="w", handler=handler, timings=FAST)]
    requeued = _job(settings, job_id)
    outcomes.append(run_job(job_id, settings=settings, worker_name="w", handler=handler, timings=FAST))
    spent = _job(settings, job_id)

    assert [outcome.status for outcome in outcomes] == ["queued", "queued"]
    assert (requeued.status, requeued.attempts, requeued.progress, requeued.worker) == (
        "queued",
        1,
        None,
        None,
    )
    assert sent == [job_id], "sent again once; the second attempt was the last"
    assert (spent.status, spent.attempts) == ("failed", 2)
    assert spent.error["type"] == (kind or "database-unavailable") and spent.error["title"]


def test_an_unreadable_file_is_no_outage_and_fails_the_job_at_once(settings: Settings) -> None:
    def handler(_ctx: JobContext) -> dict[str, Any]:
        raise OSError("cannot identify image file")

    job = _run_with(settings, handler)
    assert (job.status, job.attempts, job.error["type"]) == ("failed", 1, "internal-error")


def test_a_result_the_database_refuses_is_recorded_as_a_failure_not_left_running(settings: Settings) -> None:
    job = _run_with(settings, lambda _ctx: {"auc": float("nan")})  # NaN is not JSON: PostgreSQL refuses it

    assert (job.status, job.result, job.error["type"]) == ("failed", None, "internal-error")
    assert "could not be stored" in job.error["detail"]
