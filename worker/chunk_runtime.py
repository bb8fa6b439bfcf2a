"""The life of one chunk attempt of a sharded reindex: claim, heartbeat, stop when told, finish.

A `magtune.reindex_chunk` task brings a chunk id; the worker claims it (or, when another worker has it, the
next queued chunk of the same job) and keeps taking the job's queued chunks until none is left, so the model
is loaded once per task rather than once per chunk. The job's own worker runs chunks the same way, in
process (worker/jobs/reindex_chunks.py). Nothing here imports torch.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import get_engine, session_scope
from app.domain import JobStatus
from app.tables import Job, JobChunk, utcnow
from worker.chunk_claims import (
    ClaimedChunk,
    chunk_owned_by,
    claim_chunk,
    claim_next_chunk,
    finish_chunk,
    give_back_attempt,
)

log = logging.getLogger(__name__)

_chunks = JobChunk.__table__
_jobs = Job.__table__


class ChunkStopped(Exception):
    """The chunk stops at this batch: `reason` is cancelled (the job was cancelled or ended), paused (the job
    waits for its retry) or lost (another attempt owns the chunk)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ChunkContext:
    """What the chunk pass gets: the claimed chunk (as `job`, for the pass's log lines), settings, sessions,
    progress (carried by the heartbeat) and the stop check, read at most every `cancel_check_interval_s`."""

    def __init__(self, chunk: ClaimedChunk, settings: Settings, cancel_check_interval_s: float = 1.0) -> None:
        self.job = chunk
        self.chunk = chunk
        self.settings = settings
        self._engine = get_engine(settings.database_url)
        self._interval = cancel_check_interval_s
        self._checked_at: float | None = None
        self._stop: str | None = None
        self._lock = threading.Lock()
        self.latest: dict[str, Any] = {}

    def session(self) -> AbstractContextManager[Session]:
        return session_scope(self.settings.database_url)

    def progress(self, **fields: Any) -> None:
        with self._lock:
            self.latest = dict(fields)

    def raise_if_stopped(self) -> None:
        now = time.monotonic()
        if self._stop is None and (self._checked_at is None or now - self._checked_at >= self._interval):
            self._checked_at = now
            self.heartbeat()
        if self._stop is not None:
            raise ChunkStopped(self._stop)

    def heartbeat(self) -> None:
        """Stamp the chunk's heartbeat with its progress, and learn whether it is to stop."""
        with self._lock:
            progress = dict(self.latest)
        try:
            with self._engine.begin() as connection:
                owned = connection.execute(
                    update(_chunks)
                    .where(*chunk_owned_by(self.chunk))
                    .values(heartbeat_at=utcnow(), progress=progress or None)
                    .returning(_chunks.c.id)
                ).one_or_none()
                job = connection.execute(
                    select(_jobs.c.status, _jobs.c.cancel_requested).where(_jobs.c.id == self.chunk.job_id)
                ).one_or_none()
        except SQLAlchemyError:
            log.warning("chunk %s: could not update its row; will try again", self.chunk.id, exc_info=True)
            return
        if owned is None:
            self._stop = "lost"
        elif job is None or job.cancel_requested or job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
            self._stop = "cancelled"
        elif job.status != JobStatus.RUNNING:
            self._stop = "paused"


ChunkHandler = Callable[[ChunkContext], Mapping[str, Any]]


class _Heartbeat:
    def __init__(self, ctx: ChunkContext, interval_s: float) -> None:
        self._ctx = ctx
        self._interval = interval_s
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"chunk-{ctx.chunk.id}", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stopping.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            self._ctx.heartbeat()


def run_one_chunk(chunk: ClaimedChunk, settings: Settings, handler: ChunkHandler) -> JobStatus | None:
    """Run a claimed chunk to its end and record it; the status written (None when nothing was)."""
    ctx = ChunkContext(chunk, settings)
    engine = get_engine(settings.database_url)
    try:
        with _Heartbeat(ctx, settings.job_heartbeat_interval_s):
            progress = dict(handler(ctx))
    except ChunkStopped as stop:
        if stop.reason == "paused":
            give_back_attempt(engine, chunk)
            return JobStatus.QUEUED
        if stop.reason == "cancelled":
            finish_chunk(engine, chunk, JobStatus.CANCELLED, progress=ctx.latest)
            return JobStatus.CANCELLED
        return None
    except Exception as exc:
        log.exception("job %s chunk %d raised an unexpected error", chunk.job_id, chunk.seq)
        status = JobStatus.QUEUED if chunk.attempt < chunk.max_attempts else JobStatus.FAILED
        error = {
            "type": "internal-error",
            "title": "Internal error",
            "detail": f"{type(exc).__name__}: {exc}",
        }
        return status if finish_chunk(engine, chunk, status, progress=ctx.latest, error=error) else None
    return (
        JobStatus.SUCCEEDED if finish_chunk(engine, chunk, JobStatus.SUCCEEDED, progress=progress) else None
    )


def run_chunks(chunk_id: uuid.UUID | str, *, settings: Settings, worker_name: str) -> int:
    """A chunk task: run this chunk (or, when taken, the job's next queued one) and then every queued chunk
    of the same job that no other worker takes first; how many chunks this task ran."""
    try:
        chunk_uuid = uuid.UUID(str(chunk_id))
    except ValueError:
        log.warning("ignoring a message with a malformed chunk id %r", chunk_id)
        return 0
    with session_scope(settings.database_url) as session:
        job_id = session.scalar(select(_chunks.c.job_id).where(_chunks.c.id == chunk_uuid))
        if job_id is None:
            log.info("chunk %s does not exist; message dropped", chunk_uuid)
            return 0
        claimed = claim_chunk(session, chunk_uuid, worker_name) or claim_next_chunk(
            session, job_id, worker_name
        )
    from worker.jobs.reindex_chunks import embed_chunk  # torch, in the child process only

    ran = 0
    while claimed is not None:
        run_one_chunk(claimed, settings, embed_chunk)
        ran += 1
        with session_scope(settings.database_url) as session:
            claimed = claim_next_chunk(session, job_id, worker_name)
    return ran
