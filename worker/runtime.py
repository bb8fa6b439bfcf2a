"""The life of one job attempt on a worker: claim the row, heartbeat, report progress, finish.

The job row is the truth about a job; Celery only brings its id. Claiming and the ownership rule every
later write follows are in `worker.claims`; this module runs a handler between the claim and the finish and
gives it a `JobContext` for progress, cancellation and database sessions.

Nothing here imports torch: the Celery parent process imports this module and must stay free of CUDA.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import get_engine, session_scope
from app.domain import JobStatus
from app.jobs.training_states import discard_state
from app.queue import try_enqueue_job
from app.tables import Job, utcnow
from worker.claims import ClaimedJob, claim_job, finish_job, owned_by, requeue_job
from worker.outages import outage_of

log = logging.getLogger(__name__)

_jobs = Job.__table__

__all__ = [
    "ClaimedJob",
    "JobCancelled",
    "JobContext",
    "JobFailed",
    "Outcome",
    "Timings",
    "claim_job",
    "finish_job",
    "run_job",
]


class JobFailed(Exception):
    """A failure the job can explain to its user: bad data, an invalid checkpoint, too little feedback.

    `kind` is a short slug (like a problem type), `title` a fixed summary, `detail` what exactly went wrong.
    """

    def __init__(self, kind: str, title: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.title = title
        self.detail = detail

    def to_error(self) -> dict[str, str]:
        return {"type": self.kind, "title": self.title, "detail": self.detail}


class JobCancelled(Exception):
    """Raised by a handler (or `JobContext.raise_if_cancelled`) when the job is to stop at this point."""


@dataclass(frozen=True)
class Timings:
    """How often a running job touches its row. Progress at most every `progress_interval_s` (forced writes
    excepted), the cancel flag read at most every `cancel_check_interval_s`, and a heartbeat every
    `heartbeat_interval_s` from a thread of its own, so a single long step still shows the job is alive."""

    heartbeat_interval_s: float
    progress_interval_s: float = 0.25
    cancel_check_interval_s: float = 1.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Timings:
        return cls(heartbeat_interval_s=settings.job_heartbeat_interval_s)


class JobContext:
    """What a handler gets: the claimed job, settings, database sessions, progress and cancellation.

    Handlers open short sessions (`with ctx.session() as s:`) rather than holding one transaction open for
    the whole of a long fine-tune. Progress and heartbeat writes use their own connections and are
    conditional on this attempt owning the row; once it does not, `should_cancel()` is True.
    """

    def __init__(
        self,
        job: ClaimedJob,
        settings: Settings,
        *,
        timings: Timings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.job = job
        self.settings = settings
        self.timings = timings or Timings.from_settings(settings)
        self._engine = get_engine(settings.database_url)
        self._clock = clock
        self._lock = threading.Lock()
        self._last_progress_at: float | None = None
        self._last_cancel_check_at: float | None = None
        self._pending: dict[str, Any] | None = None
        self._latest: dict[str, Any] | None = None
        self._cancel_requested = False
        self._lost = False
        self.progress_writes = 0

    @property
    def params(self) -> dict[str, Any]:
        return self.job.params

    @property
    def latest_progress(self) -> dict[str, Any] | None:
        return self._latest

    def session(self) -> AbstractContextManager[Session]:
        return session_scope(self.settings.database_url)

    def progress(self, *, force: bool = False, **fields: Any) -> bool:
        """Replace the job's progress with `fields`; True when written now.

        A write within `progress_interval_s` of the last is held back (the heartbeat or the next write carries
        the newest held-back value); `force=True` always writes: the first and last step of an epoch, a new
        phase.
        """
        snapshot = {key: _plain(value) for key, value in fields.items()}
        now = self._clock()
        with self._lock:
            self._latest = snapshot
            recent = self._last_progress_at is not None and now - self._last_progress_at < (
                self.timings.progress_interval_s
            )
            if recent and not force:
                self._pending = snapshot
                return False
            self._pending = None
            self._last_progress_at = now
        self._touch(progress=snapshot)
        return True

    def should_cancel(self) -> bool:
        """True once cancellation was requested or this attempt lost the row; reads the flag at most once per
        `cancel_check_interval_s` (the heartbeat refreshes it too)."""
        if self._cancel_requested or self._lost:
            return True
        now = self._clock()
        if self._last_cancel_check_at is not None and now - self._last_cancel_check_at < (
            self.timings.cancel_check_interval_s
        ):
            return False
        self._last_cancel_check_at = now
        self._touch(progress=None, heartbeat=False)
        return self._cancel_requested or self._lost

    def raise_if_cancelled(self, where: str = "") -> None:
        if self.should_cancel():
            raise JobCancelled(f"cancelled {where}".strip())

    def heartbeat(self) -> None:
        """Stamp `heartbeat_at` (with any held-back progress) and refresh the cancel flag."""
        with self._lock:
            pending, self._pending = self._pending, None
            if pending is not None:
                self._last_progress_at = self._clock()
        self._touch(progress=pending)

    def _touch(self, *, progress: dict[str, Any] | None, heartbeat: bool = True) -> None:
        """One conditional write (or read) of the row; a database hiccup is logged, never fatal to the job."""
        try:
            self._touch_row(progress, heartbeat)
        except SQLAlchemyError:
            log.warning("job %s: could not update its row; will try again", self.job.id, exc_info=True)

    def _touch_row(self, progress: dict[str, Any] | None, heartbeat: bool) -> None:
        values: dict[str, Any] = {}
        if heartbeat:
            values["heartbeat_at"] = utcnow()
        if progress is not None:
            values["progress"] = progress
        with self._engine.begin() as connection:
            if values:
                statement = update(_jobs).where(*owned_by(self.job)).values(**values)
                row = connection.execute(statement.returning(_jobs.c.cancel_requested)).one_or_none()
            else:
                row = connection.execute(
                    select(_jobs.c.cancel_requested).where(*owned_by(self.job))
                ).one_or_none()
        if progress is not None and row is not None:
            self.progress_writes += 1
        if row is None:
            if not self._lost:
                log.warning(
                    "job %s attempt %d no longer owns its row; stopping", self.job.id, self.job.attempt
                )
            self._lost = True
        elif row.cancel_requested and not self._cancel_requested:
            log.info("job %s: cancellation requested", self.job.id)
            self._cancel_requested = True


def _plain(value: Any) -> Any:
    """JSON-ready: numpy and torch scalars (anything with `.item()`) become Python numbers."""
    item = getattr(value, "item", None)
    return item() if callable(item) and not isinstance(value, str | bytes) else value


class _Heartbeat:
    """A daemon thread calling `ctx.heartbeat()` every interval while the handler runs."""

    def __init__(self, ctx: JobContext) -> None:
        self._ctx = ctx
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{ctx.job.id}", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self._ctx.timings.heartbeat_interval_s):
            try:
                self._ctx.heartbeat()
            except Exception:
                log.warning("job %s: heartbeat failed", self._ctx.job.id, exc_info=True)


Handler = Callable[[JobContext], Mapping[str, Any]]


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended: a finished status, or `queued` when an outage hands the job back for a retry."""

    status: JobStatus
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


def _outcome_of(handler: Handler | None, ctx: JobContext) -> Outcome:
    try:
        handler = handler or _registered_handler(ctx.job.kind)
        return Outcome(JobStatus.SUCCEEDED, result=dict(handler(ctx)))
    except JobCancelled as exc:
        return Outcome(
            JobStatus.CANCELLED, error={"type": "cancelled", "title": "Cancelled", "detail": str(exc)}
        )
    except JobFailed as exc:
        log.info("job %s failed: %s", ctx.job.id, exc.detail)
        return Outcome(JobStatus.FAILED, error=exc.to_error())
    except SoftTimeLimitExceeded:
        limit = ctx.settings.job_soft_time_limit_s
        detail = f"the job ran past its time limit of {limit} s"
        return Outcome(
            JobStatus.FAILED, error={"type": "time-limit", "title": "Time limit exceeded", "detail": detail}
        )
    except Exception as exc:
        outage = outage_of(exc)
        if outage is not None:
            log.warning("job %s (%s) met an outage", ctx.job.id, ctx.job.kind, exc_info=True)
            return Outcome(JobStatus.QUEUED, error=outage)
        log.exception("job %s (%s) raised an unexpected error", ctx.job.id, ctx.job.kind)
        detail = f"{type(exc).__name__}: {exc}"
        return Outcome(
            JobStatus.FAILED, error={"type": "internal-error", "title": "Internal error", "detail": detail}
        )


def run_job(
    job_id: uuid.UUID | str,
    *,
    settings: Settings,
    worker_name: str,
    handler: Handler | None = None,
    expected_kind: str | None = None,
    timings: Timings | None = None,
) -> Outcome | None:
    """Claim, run and finish one job; None when this delivery was not the one to run it.

    `handler` defaults to the one registered for the job's kind (`worker.jobs.handler_for`), imported only
    now, so torch is loaded in the process that runs the job and never in the Celery parent.
    """
    with session_scope(settings.database_url) as session:
        claimed = claim_job(session, job_id, worker_name)
    if claimed is None:
        return None
    engine = get_engine(settings.database_url)
    if expected_kind is not None and claimed.kind != expected_kind:
        detail = f"a {claimed.kind} job was delivered to the {expected_kind} task"
        outcome = Outcome(
            JobStatus.FAILED, error={"type": "wrong-kind", "title": "Wrong task", "detail": detail}
        )
        finish_job(engine, claimed, outcome.status, error=outcome.error)
        return outcome
    ctx = JobContext(claimed, settings, timings=timings)
    started = time.monotonic()
    with _Heartbeat(ctx):
        outcome = _outcome_of(handler, ctx)
    written = _write_outcome(engine, ctx, outcome)
    if written is not None and JobStatus(written).finished:
        discard_state(settings, claimed.id)  # any end: nothing will resume from it
    elif written == JobStatus.QUEUED:
        try_enqueue_job(settings, claimed.id, claimed.kind)
    log.info("job %s took %.1f s", claimed.id, time.monotonic() - started)
    return outcome


def _write_outcome(engine: Any, ctx: JobContext, outcome: Outcome) -> str | None:
    """Record the attempt's end; the status written, or None when the attempt no longer owns the row.

    The database may be down just when a long job ends. Dropping the write would leave the row `running`
    until the sweeper's heartbeat timeout and then run the job again, so it is retried (1, 2, 4 … 10 s
    apart) for as long as that timeout; it lands within seconds of the database coming back. Past it, the
    sweeper, which has stopped seeing heartbeats, requeues the job on its next pass. An end the database
    refuses (a result it cannot store) is recorded as a failure instead of being retried.
    """
    deadline = time.monotonic() + ctx.settings.job_heartbeat_timeout_s
    delay = 1.0
    while True:
        try:
            if outcome.status == JobStatus.QUEUED:
                return requeue_job(engine, ctx.job, outcome.error or {})
            applied = finish_job(
                engine,
                ctx.job,
                outcome.status,
                result=outcome.result,
                error=outcome.error,
                progress=ctx.latest_progress,
            )
            return outcome.status if applied else None
        except SQLAlchemyError as exc:
            if outage_of(exc) is None:  # the database answered: the end itself cannot be stored
                if outcome.result is None and outcome.status == JobStatus.FAILED:
                    raise
                log.exception("job %s: its end could not be recorded; recording a failure", ctx.job.id)
                outcome = _unrecordable(exc)
                continue
            if time.monotonic() + delay > deadline:
                raise
            log.warning("job %s: could not record its end; trying again in %.0f s", ctx.job.id, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def _unrecordable(exc: SQLAlchemyError) -> Outcome:
    detail = f"the job's result could not be stored: {type(exc.orig or exc).__name__}"
    error = {"type": "internal-error", "title": "Internal error", "detail": detail}
    return Outcome(JobStatus.FAILED, error=error)


def _registered_handler(kind: str) -> Handler:
    from worker.jobs import handler_for

    return handler_for(kind)
