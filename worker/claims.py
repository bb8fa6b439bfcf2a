"""Who runs a job: the atomic claim of its row, and the conditional writes only the claiming attempt may make.

A message can arrive twice (a redelivery after a lost worker, a sweeper re-send), so the row is claimed with
one conditional UPDATE (queued → running) and only the attempt that won it runs. Every later write of that
attempt is conditional on it still owning the row (status running and `attempts` equal to its own number):
when the sweeper has given up on a silent worker and another attempt has claimed the job, the old one can no
longer overwrite it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, null, select, update
from sqlalchemy.orm import Session

from app.domain import FINISHED_JOB_STATUSES, JobStatus
from app.tables import Job, utcnow

log = logging.getLogger(__name__)

_jobs = Job.__table__

DONE_PHASE = "done"


@dataclass(frozen=True)
class ClaimedJob:
    """The job as this attempt claimed it; `attempt` is the row's `attempts` right after the claim."""

    id: uuid.UUID
    kind: str
    params: dict[str, Any]
    attempt: int
    worker: str
    parent_job_id: uuid.UUID | None


def _as_uuid(job_id: uuid.UUID | str) -> uuid.UUID | None:
    if isinstance(job_id, uuid.UUID):
        return job_id
    try:
        return uuid.UUID(str(job_id))
    except ValueError:
        return None


def claim_job(session: Session, job_id: uuid.UUID | str, worker_name: str) -> ClaimedJob | None:
    """Take a queued job for this worker, or None when it is not ours to run (and say why in the log).

    One conditional UPDATE decides, so of two workers given the same id exactly one wins. A queued job whose
    cancellation was requested is marked cancelled instead; one whose attempts are spent is marked failed.
    Commits the session.
    """
    job_uuid = _as_uuid(job_id)
    if job_uuid is None:
        log.warning("ignoring a message with a malformed job id %r", job_id)
        return None
    now = utcnow()
    row = session.execute(
        update(_jobs)
        .where(
            _jobs.c.id == job_uuid,
            _jobs.c.status == JobStatus.QUEUED,
            _jobs.c.attempts < _jobs.c.max_attempts,
            _jobs.c.cancel_requested.is_(False),
        )
        .values(
            status=JobStatus.RUNNING,
            attempts=_jobs.c.attempts + 1,
            started_at=now,
            heartbeat_at=now,
            finished_at=None,
            worker=worker_name,
            progress=null(),
            result=null(),
            error=null(),
        )
        .returning(_jobs.c.id, _jobs.c.kind, _jobs.c.params, _jobs.c.attempts, _jobs.c.parent_job_id)
    ).one_or_none()
    session.commit()
    if row is not None:
        log.info("job %s (%s) claimed by %s, attempt %d", row.id, row.kind, worker_name, row.attempts)
        return ClaimedJob(
            row.id, row.kind, dict(row.params or {}), row.attempts, worker_name, row.parent_job_id
        )
    _settle_unclaimable(session, job_uuid)
    return None


def _settle_unclaimable(session: Session, job_id: uuid.UUID) -> None:
    """Log why a job was not claimed; close a queued job that was cancelled or has no attempts left."""
    job = session.execute(
        select(
            _jobs.c.status, _jobs.c.cancel_requested, _jobs.c.attempts, _jobs.c.max_attempts, _jobs.c.worker
        ).where(_jobs.c.id == job_id)
    ).one_or_none()
    if job is None:
        log.warning("job %s does not exist; message dropped", job_id)
        return
    if job.status != JobStatus.QUEUED:
        log.info(
            "job %s is %s (attempt %d, %s); this delivery exits", job_id, job.status, job.attempts, job.worker
        )
        return
    if job.cancel_requested:
        status, error = JobStatus.CANCELLED, None
    else:
        status = JobStatus.FAILED
        error = {
            "type": "attempts-exhausted",
            "title": "No attempts left",
            "detail": f"started {job.attempts} times without finishing (limit {job.max_attempts})",
        }
    session.execute(
        update(_jobs)
        .where(_jobs.c.id == job_id, _jobs.c.status == JobStatus.QUEUED)
        .values(status=status, error=error if error is not None else null(), finished_at=utcnow())
    )
    session.commit()
    log.info("job %s was queued but not runnable; marked %s", job_id, status)


def owned_by(job: ClaimedJob) -> tuple[Any, ...]:
    return (_jobs.c.id == job.id, _jobs.c.status == JobStatus.RUNNING, _jobs.c.attempts == job.attempt)


def finish_job(
    engine: Engine,
    job: ClaimedJob,
    status: str,
    *,
    result: Mapping[str, Any] | None = None,
    error: Mapping[str, Any] | None = None,
    progress: Mapping[str, Any] | None = None,
) -> bool:
    """Record how the attempt ended; False (and nothing written) when the attempt no longer owns the row.

    A succeeded job's progress says `phase: "done"` (its other fields kept), so a client polling progress
    alone never sees a finished job stuck in its last working phase; a failed or cancelled one keeps the
    phase it stopped in, which tells where it went wrong.
    """
    if status not in FINISHED_JOB_STATUSES:
        raise ValueError(f"a job finishes as succeeded, failed or cancelled, not {status!r}")
    if status == "succeeded":
        progress = {**(progress or {}), "phase": DONE_PHASE}
    now = utcnow()
    values: dict[str, Any] = {
        "status": status,
        "result": dict(result) if result is not None else null(),
        "error": dict(error) if error is not None else null(),
        "finished_at": now,
        "heartbeat_at": now,
    }
    if progress is not None:
        values["progress"] = dict(progress)
    with engine.begin() as connection:
        applied = connection.execute(update(_jobs).where(*owned_by(job)).values(**values)).rowcount == 1
    if applied:
        log.info("job %s (%s) %s", job.id, job.kind, status)
    else:
        log.warning(
            "job %s attempt %d ended (%s) but no longer owns the row; nothing written",
            job.id,
            job.attempt,
            status,
        )
    return applied


def requeue_job(engine: Engine, job: ClaimedJob, error: Mapping[str, Any]) -> str | None:
    """Hand the attempt's job back as a dead worker's would be (queued, its progress cleared) while it has
    attempts left, else fail it with `error`; the status written, or None when the attempt no longer owns
    the row. The caller sends the message (enqueued_at is left unset, so the sweeper sends it otherwise)."""
    with engine.begin() as connection:
        requeued = connection.execute(
            update(_jobs)
            .where(*owned_by(job), _jobs.c.attempts < _jobs.c.max_attempts)
            .values(
                status=JobStatus.QUEUED, worker=None, heartbeat_at=None, progress=null(), enqueued_at=None
            )
        ).rowcount
    if requeued:
        log.warning(
            "job %s attempt %d met an outage (%s); queued again", job.id, job.attempt, error["detail"]
        )
        return JobStatus.QUEUED
    return JobStatus.FAILED if finish_job(engine, job, JobStatus.FAILED, error=error) else None
