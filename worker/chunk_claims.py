"""Who runs a chunk of a sharded reindex: the atomic claim of its row and the writes only that attempt makes.

The same rule as job rows (worker/claims.py): one conditional UPDATE (queued → running) decides which of
several workers runs a chunk, and every later write is conditional on the attempt still owning it (status
running, `attempts` its own). A chunk is claimable only while its job is running and not being cancelled,
so chunks never run for a job that ended or waits for its retry.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, exists, null, select, update
from sqlalchemy.orm import Session

from app.domain import JobStatus
from app.tables import Job, JobChunk, utcnow

log = logging.getLogger(__name__)

_chunks = JobChunk.__table__
_jobs = Job.__table__
# A claimer that loses a race for one chunk tries the next; this many candidates per look.
CANDIDATES = 8


@dataclass(frozen=True)
class ClaimedChunk:
    """The chunk as this attempt claimed it: its job, range (None: open) and attempt number."""

    id: uuid.UUID
    job_id: uuid.UUID
    seq: int
    model_id: uuid.UUID
    lo: tuple[datetime, uuid.UUID] | None
    hi: tuple[datetime, uuid.UUID] | None
    attempt: int
    max_attempts: int
    worker: str


def _job_open(job_id: Any) -> Any:
    return exists().where(
        _jobs.c.id == job_id, _jobs.c.status == JobStatus.RUNNING, _jobs.c.cancel_requested.is_(False)
    )


def _bound(created_at: datetime | None, face_id: uuid.UUID | None) -> tuple[datetime, uuid.UUID] | None:
    return (created_at, face_id) if created_at is not None and face_id is not None else None


def claim_chunk(session: Session, chunk_id: uuid.UUID, worker_name: str) -> ClaimedChunk | None:
    """Take a queued chunk whose job is running, or None when another worker has it (or nothing is left to
    do). One conditional UPDATE decides. Commits the session."""
    now = utcnow()
    row = session.execute(
        update(_chunks)
        .where(
            _chunks.c.id == chunk_id,
            _chunks.c.status == JobStatus.QUEUED,
            _chunks.c.attempts < _chunks.c.max_attempts,
            _job_open(_chunks.c.job_id),
        )
        .values(
            status=JobStatus.RUNNING,
            attempts=_chunks.c.attempts + 1,
            started_at=now,
            heartbeat_at=now,
            finished_at=None,
            worker=worker_name,
            error=null(),
        )
        .returning(*_chunks.c)
    ).one_or_none()
    session.commit()
    if row is None:
        return None
    log.info("job %s chunk %d claimed by %s, attempt %d", row.job_id, row.seq, worker_name, row.attempts)
    return ClaimedChunk(
        row.id,
        row.job_id,
        row.seq,
        row.model_id,
        _bound(row.lo_created_at, row.lo_id),
        _bound(row.hi_created_at, row.hi_id),
        row.attempts,
        row.max_attempts,
        worker_name,
    )


def claim_next_chunk(session: Session, job_id: uuid.UUID, worker_name: str) -> ClaimedChunk | None:
    """Take the first queued chunk of the job that no other worker takes first; None when none is left."""
    while True:
        candidates = list(
            session.scalars(
                select(_chunks.c.id)
                .where(
                    _chunks.c.job_id == job_id,
                    _chunks.c.status == JobStatus.QUEUED,
                    _chunks.c.attempts < _chunks.c.max_attempts,
                )
                .order_by(_chunks.c.seq)
                .limit(CANDIDATES)
            )
        )
        if not candidates:
            session.commit()
            return None
        for chunk_id in candidates:
            claimed = claim_chunk(session, chunk_id, worker_name)
            if claimed is not None:
                return claimed
        if not session.scalar(select(_job_open(job_id))):
            return None


def chunk_owned_by(chunk: ClaimedChunk) -> tuple[Any, ...]:
    return (
        _chunks.c.id == chunk.id,
        _chunks.c.status == JobStatus.RUNNING,
        _chunks.c.attempts == chunk.attempt,
    )


def finish_chunk(
    engine: Engine,
    chunk: ClaimedChunk,
    status: JobStatus,
    *,
    progress: Mapping[str, Any] | None = None,
    error: Mapping[str, Any] | None = None,
) -> bool:
    """Record how the attempt ended; False (nothing written) when it no longer owns the chunk.

    `queued` hands the chunk back for another attempt (after an error, while attempts remain; or, with the
    attempt given back, when its job stopped running without being cancelled: the job's retry redoes it).
    """
    now = utcnow()
    values: dict[str, Any] = {
        "status": status,
        "heartbeat_at": now,
        "error": dict(error) if error else null(),
    }
    if status == JobStatus.QUEUED:
        values["worker"] = None
    else:
        values["finished_at"] = now
    if progress is not None:
        values["progress"] = dict(progress)
    with engine.begin() as connection:
        applied = connection.execute(update(_chunks).where(*chunk_owned_by(chunk)).values(**values)).rowcount
    if not applied:
        log.warning("job %s chunk %d ended (%s) but no longer owns its row", chunk.job_id, chunk.seq, status)
    return applied == 1


def give_back_attempt(engine: Engine, chunk: ClaimedChunk) -> None:
    """Hand a chunk back without counting the attempt: its job stopped running, not the chunk."""
    with engine.begin() as connection:
        connection.execute(
            update(_chunks)
            .where(*chunk_owned_by(chunk))
            .values(status=JobStatus.QUEUED, worker=None, attempts=_chunks.c.attempts - 1)
        )
