"""A large reindex shared by every worker on the queue: planning its chunks, the pass over one chunk, and the
job's own worker taking chunks while it waits for the others.

When more faces are missing than MAGTUNE_REINDEX_CHUNK_SIZE, the job's worker cuts the missing faces, in
(created_at, id) order, into ranges of that many (one indexed query per boundary; nothing lists the faces)
and stores them as `job_chunks` rows with one `magtune.reindex_chunk` message each. Any idle worker takes
chunks (worker/chunk_runtime.py); the job's worker takes them too, and sums the chunks' progress into the
job's. The last chunk is open-ended, so faces stored during the reindex fall in it; those that arrive after
it ran are taken by the job's final pass from the oldest face (worker/jobs/reindex.py), as in an unsharded
reindex, and by the embed-on-arrival jobs.

A chunk writes batches like any pass (`_write`: ON CONFLICT DO NOTHING on (face, model)), so a chunk run
twice, or overlapping the final pass, writes nothing twice. A dead worker's chunk is requeued by the
sweeper (app/jobs/sweeper.py) until its attempts are spent; a chunk that spends them fails the job. A
re-run of the job (its worker died) keeps the chunks it planned.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import exists, func, literal, select, tuple_, update
from sqlalchemy.orm import Session

from app.domain import JobStatus
from app.queue import send_chunk
from app.tables import Face, FaceEmbedding, JobChunk
from worker.chunk_claims import claim_next_chunk
from worker.chunk_runtime import ChunkContext, run_one_chunk
from worker.claims import owned_by
from worker.jobs.model_cache import cached_model
from worker.jobs.registry import LoadedModel, model_row
from worker.jobs.reindex import Cursor, _aware, _embed_rows, _missing_batch, _position, _write
from worker.runtime import JobCancelled, JobContext, JobFailed

log = logging.getLogger(__name__)

WAIT_S = 0.5  # how often the job's worker looks at the chunks while others run them


@dataclass(frozen=True)
class ChunkTotals:
    chunks: int
    embedded: int
    batches: int


def plan_boundaries(session: Session, model_id: uuid.UUID, chunk_size: int) -> list[Cursor]:
    """The last face of each full chunk of `chunk_size` missing faces, in (created_at, id) order.

    Each boundary is one query that skips `chunk_size - 1` missing faces after the previous one.
    """
    embedded = exists().where(FaceEmbedding.face_id == Face.id, FaceEmbedding.model_id == model_id)
    bounds: list[Cursor] = []
    while True:
        statement = select(Face.id, Face.created_at).where(~embedded)
        if bounds:
            last = bounds[-1]
            position = tuple_(literal(last[0], Face.created_at.type), literal(last[1], Face.id.type))
            statement = statement.where(tuple_(Face.created_at, Face.id) > position)
        row = session.execute(
            statement.order_by(Face.created_at, Face.id).offset(chunk_size - 1).limit(1)
        ).first()
        if row is None:
            return bounds
        bounds.append(_position(row))


def plan_chunks(
    session: Session, job_id: uuid.UUID, model_id: uuid.UUID, chunk_size: int, max_attempts: int
) -> int:
    """Store the job's chunks unless it has some already (a re-run keeps its plan); how many it has.

    None are stored when at most `chunk_size` faces are missing: the job runs as one pass. Not committed.
    """
    have = session.scalar(select(func.count()).select_from(JobChunk).where(JobChunk.job_id == job_id)) or 0
    if have:
        return int(have)
    bounds = plan_boundaries(session, model_id, chunk_size)
    if bounds and not _any_after(session, model_id, bounds[-1]):
        bounds.pop()  # the last full chunk ends at the newest face: it becomes the open-ended one
    if not bounds:
        return 0
    starts: list[Cursor | None] = [None, *bounds]
    ends: list[Cursor | None] = [*bounds, None]
    for seq, (lo, hi) in enumerate(zip(starts, ends, strict=True)):
        session.add(
            JobChunk(
                job_id=job_id,
                seq=seq,
                model_id=model_id,
                lo_created_at=lo[0] if lo else None,
                lo_id=lo[1] if lo else None,
                hi_created_at=hi[0] if hi else None,
                hi_id=hi[1] if hi else None,
                status=JobStatus.QUEUED,
                attempts=0,
                max_attempts=max_attempts,
            )
        )
    session.flush()
    return len(starts)


def _any_after(session: Session, model_id: uuid.UUID, after: Cursor) -> bool:
    return bool(_missing_batch(session, model_id, after, set(), 1))


def embed_chunk(ctx: ChunkContext) -> dict[str, Any]:
    """Embed the faces of the chunk's range that miss an embedding by its model, batch by batch."""
    chunk = ctx.chunk
    with ctx.session() as session:
        model = cached_model(ctx.settings, model_row(session, chunk.model_id))
    lo = (_aware(chunk.lo[0]), chunk.lo[1]) if chunk.lo else None
    hi = (_aware(chunk.hi[0]), chunk.hi[1]) if chunk.hi else None
    batch_size = ctx.settings.reindex_batch_size
    skipped: set[uuid.UUID] = set()
    cursor, embedded, batches = lo, 0, 0
    while True:
        ctx.raise_if_stopped()
        with ctx.session() as session:
            batch = _missing_batch(session, model.id, cursor, skipped, batch_size, until=hi)
        if not batch:
            break
        cursor = _position(batch[-1])
        rows = _embed_rows(ctx, model, batch, skipped)
        if rows:
            embedded += _write(ctx, model.id, rows)[0]
        batches += 1
        ctx.progress(embedded=embedded, skipped=len(skipped), batches=batches)
    return {"embedded": embedded, "skipped": len(skipped), "batches": batches}


def _send_queued(ctx: JobContext) -> None:
    with ctx.session() as session:
        queued = session.scalars(
            select(JobChunk.id)
            .where(JobChunk.job_id == ctx.job.id, JobChunk.status == JobStatus.QUEUED)
            .order_by(JobChunk.seq)
        ).all()
    for chunk_id in queued:
        try:
            send_chunk(ctx.settings, chunk_id)
        except Exception:
            log.warning("job %s: could not send chunk %s; this worker takes it", ctx.job.id, chunk_id)
            return


def _cancel_queued(ctx: JobContext) -> None:
    """Cancel the job's queued chunks, unless this attempt lost the job (its retry will run them)."""
    with ctx.session() as session:
        session.execute(
            update(JobChunk)
            .where(
                JobChunk.job_id == ctx.job.id,
                JobChunk.status == JobStatus.QUEUED,
                exists().where(*owned_by(ctx.job)),
            )
            .values(status=JobStatus.CANCELLED)
            .execution_options(synchronize_session=False)
        )


def _chunk_rows(ctx: JobContext) -> list[Any]:
    with ctx.session() as session:
        return list(
            session.execute(
                select(JobChunk.seq, JobChunk.status, JobChunk.progress, JobChunk.error, JobChunk.attempts)
                .where(JobChunk.job_id == ctx.job.id)
                .order_by(JobChunk.seq)
            ).all()
        )


def _failure(row: Any) -> JobFailed:
    why = (row.error or {}).get("detail") or "its worker stopped"
    return JobFailed(
        "chunk-failed",
        "A chunk of the reindex failed",
        f"chunk {row.seq} failed after {row.attempts} attempts: {why}",
    )


def run_sharded(ctx: JobContext, model: LoadedModel, missing: int | None) -> ChunkTotals | None:
    """Plan (or resume) the job's chunks and see them all done, taking queued ones itself; None when the
    reindex is small enough for one pass. Raises JobCancelled (queued chunks cancelled too) or JobFailed."""
    chunk_size = ctx.settings.reindex_chunk_size
    if missing is not None and missing <= chunk_size:
        with ctx.session() as session:
            if not session.scalar(select(exists().where(JobChunk.job_id == ctx.job.id))):
                return None
    with ctx.session() as session:
        count = plan_chunks(session, ctx.job.id, model.id, chunk_size, ctx.settings.job_max_attempts)
    if not count:
        return None
    log.info("job %s: %d chunks of up to %d faces", ctx.job.id, count, chunk_size)
    # Before any chunk can start (this worker runs one too, and writes nothing until it ends): the job reads
    # `embedding` for as long as its chunks run.
    with ctx.session() as session:
        done_before = session.scalar(
            select(func.count()).where(JobChunk.job_id == ctx.job.id, JobChunk.status == JobStatus.SUCCEEDED)
        )
    ctx.progress(phase="embedding", missing=missing, chunks=count, chunks_done=done_before or 0, force=True)
    _send_queued(ctx)
    try:
        while True:
            ctx.raise_if_cancelled("while its chunks ran")
            with ctx.session() as session:
                claimed = claim_next_chunk(session, ctx.job.id, ctx.job.worker)
            if claimed is not None:
                run_one_chunk(claimed, ctx.settings, embed_chunk)
            rows = _chunk_rows(ctx)
            failed = [row for row in rows if row.status == JobStatus.FAILED]
            if failed:
                raise _failure(failed[0])
            if any(row.status == JobStatus.CANCELLED for row in rows):
                raise JobCancelled("while its chunks ran")
            done = sum(row.status == JobStatus.SUCCEEDED for row in rows)
            embedded = sum(int((row.progress or {}).get("embedded", 0)) for row in rows)
            batches = sum(int((row.progress or {}).get("batches", 0)) for row in rows)
            ctx.progress(
                phase="embedding",
                missing=missing,
                embedded=embedded,
                batches=batches,
                chunks=len(rows),
                chunks_done=done,
                force=done == len(rows),
            )
            if done == len(rows):
                return ChunkTotals(len(rows), embedded, batches)
            if claimed is None:
                time.sleep(WAIT_S)
    except (JobCancelled, JobFailed):
        _cancel_queued(ctx)
        raise
