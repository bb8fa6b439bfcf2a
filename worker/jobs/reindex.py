"""The embedding pass of `reindex` and `embed` jobs: embed every face without an embedding by the job's model.

The pass asks the database, batch after batch, which faces still miss an embedding by the model, until none
do. So a pass that was cancelled or killed resumes from what is missing instead of starting over, and faces
stored while it runs are taken too. A `reindex` of a model that already has embeddings embeds only what is
missing: an embedding is keyed by (face, model) and is a deterministic function of the checkpoint (the id's
sha256 never changes) and the image (content-addressed), so an existing row never needs recomputing.

Each batch is one transaction: it bumps the model's EmbeddingGeneration row (which locks it, so writers of one
model commit in generation order) and inserts its rows with that generation, skipping any that exist, so a
batch done twice writes nothing twice. A face deleted meanwhile is dropped on a retry; a face whose image
cannot be decoded is skipped and counted, and stays missing. At the end the model is marked as covering every
face when it does, which puts it in service for verify and search (app/models/serving.py).

The same transaction moves the model's watermark (EmbeddingGeneration.covered_created_at, covered_id) forward
to the last face of the stretch the pass has covered without a gap: every face up to it has an embedding or
was found undecodable. An `embed` job (small, one per few arrivals) starts its scan at the watermark and
counts nothing over every face, so it costs what is missing plus the faces stored in the last
MAGTUNE_EMBED_WATERMARK_LAG_S, not the whole table. A face's created_at is set before its row commits, so a
face can commit after a later one: the watermark never passes what was older than that lag when the scan
that covered it began, and a face that commits behind an embed pass's cursor (within the lag) is taken by the
embed job its own upload queues after its commit. A `reindex` always scans from the oldest face, looks once
more from the oldest at the end and counts what is missing: it is what embeds a face behind the watermark,
such as one whose image was fixed after a pass skipped it.
"""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import numpy as np
import torch
from sqlalchemy import Row, exists, literal, or_, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import dialect_insert
from app.domain import JobKind
from app.models.serving import mark_embedded_if_complete, missing_faces
from app.tables import EmbeddingGeneration, Face, FaceEmbedding, utcnow
from worker.jobs.data import decode_face
from worker.jobs.model_cache import cached_model
from worker.jobs.registry import LoadedModel, blob_store, model_row
from worker.ml.embedding import embed_pixels
from worker.ml.preprocessing import ImageDecodeError
from worker.runtime import JobContext

log = logging.getLogger(__name__)


class PassContext(Protocol):
    """What the batch helpers need of a job's or a chunk's context: settings, sessions, an id to log."""

    settings: Settings

    @property
    def job(self) -> Any: ...

    def session(self) -> AbstractContextManager[Session]: ...


Cursor = tuple[Any, uuid.UUID]  # (created_at, id) of the last face a query returned
NIL = uuid.UUID(int=0)  # (t, NIL) is the position just before every face created at t


def _aware(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored one is UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _position(row: Row[Any]) -> Cursor:
    return (_aware(row.created_at), row.id)


def _after(a: Cursor | None, b: Cursor | None) -> bool:
    """Whether position a is after b, None being before every face."""
    return a is not None and (b is None or a > b)


def _missing_batch(
    session: Session,
    model_id: uuid.UUID,
    after: Cursor | None,
    skipped: set[uuid.UUID],
    limit: int,
    until: Cursor | None = None,
) -> list[Row[Any]]:
    """The next faces without an embedding by the model, in (created_at, id) order after `after`.

    The cursor keeps each query from rescanning the faces the pass has embedded already (on millions of faces,
    restarting from the oldest every batch would be quadratic); `after=None` starts from the oldest, which
    catches faces committed late with an earlier timestamp. Faces in `skipped` (undecodable) are left out;
    `until` (a chunk's end) is the last position taken.
    """
    embedded = exists().where(FaceEmbedding.face_id == Face.id, FaceEmbedding.model_id == model_id)
    statement = select(Face.id, Face.sha256, Face.created_at).where(~embedded)
    if after is not None:
        last = tuple_(literal(after[0], Face.created_at.type), literal(after[1], Face.id.type))
        statement = statement.where(tuple_(Face.created_at, Face.id) > last)
    if until is not None:
        end = tuple_(literal(until[0], Face.created_at.type), literal(until[1], Face.id.type))
        statement = statement.where(tuple_(Face.created_at, Face.id) <= end)
    if skipped:
        statement = statement.where(Face.id.not_in(skipped))
    return list(session.execute(statement.order_by(Face.created_at, Face.id).limit(limit)).all())


def _bump_generation(session: Session, model_id: uuid.UUID) -> int:
    """Take the model's next generation; the row lock it holds until commit orders writers of one model."""
    table = EmbeddingGeneration
    statement = (
        dialect_insert(session, table)
        .values(model_id=model_id, generation=1)
        .on_conflict_do_update(index_elements=[table.model_id], set_={"generation": table.generation + 1})
        .returning(table.generation)
    )
    return int(session.execute(statement).scalar_one())


def _watermark(session: Session, model_id: uuid.UUID) -> Cursor | None:
    statement = select(EmbeddingGeneration.covered_created_at, EmbeddingGeneration.covered_id).where(
        EmbeddingGeneration.model_id == model_id
    )
    row = session.execute(statement).first()
    if row is None or row.covered_created_at is None or row.covered_id is None:
        return None
    return (_aware(row.covered_created_at), row.covered_id)


def _advance_watermark(session: Session, model_id: uuid.UUID, to: Cursor) -> None:
    """Move the model's watermark to `to` unless it is there or further already (passes may run side by side:
    each one's claim holds on its own, so the furthest one does)."""
    table = EmbeddingGeneration
    position = tuple_(literal(to[0], table.covered_created_at.type), literal(to[1], table.covered_id.type))
    stored = tuple_(table.covered_created_at, table.covered_id)
    behind = or_(table.covered_created_at.is_(None), stored < position)
    session.execute(
        update(table)
        .where(table.model_id == model_id, behind)
        .values(covered_created_at=to[0], covered_id=to[1])
        .execution_options(synchronize_session=False)
    )


def _insert_rows(session: Session, rows: list[dict[str, Any]]) -> int:
    """Insert the rows that do not exist yet; how many were inserted."""
    statement = (
        dialect_insert(session, FaceEmbedding)
        .values(rows)
        .on_conflict_do_nothing(index_elements=[FaceEmbedding.face_id, FaceEmbedding.model_id])
        .returning(FaceEmbedding.face_id)
    )
    return len(session.execute(statement).all())


def _write(
    ctx: PassContext, model_id: uuid.UUID, rows: list[dict[str, Any]], watermark: Cursor | None = None
) -> tuple[int, int | None]:
    """Write one batch in one transaction under a new generation: (rows inserted, generation).

    The transaction also moves the model's watermark to `watermark`, when given, while it holds the row's
    lock. A face deleted since it was read makes the insert fail on its foreign key; the batch is then retried
    without the faces that are gone. No generation (None) means nothing was written, watermark included.
    """
    for attempt in range(2):
        try:
            with ctx.session() as session:
                if attempt:
                    alive = set(
                        session.scalars(select(Face.id).where(Face.id.in_([r["face_id"] for r in rows])))
                    )
                    rows = [r for r in rows if r["face_id"] in alive]
                if not rows:
                    return 0, None
                generation = _bump_generation(session, model_id)
                inserted = _insert_rows(session, [{**row, "generation": generation} for row in rows])
                if watermark is not None:
                    _advance_watermark(session, model_id, watermark)
                return inserted, generation
        except IntegrityError:
            if attempt:
                raise
            log.info("job %s: a face was deleted during the batch; retrying without it", ctx.job.id)
    return 0, None


def _embed_rows(
    ctx: PassContext, model: LoadedModel, batch: list[Row[Any]], skipped: set[uuid.UUID]
) -> list[dict[str, Any]]:
    """Decode and embed a batch; faces that cannot be decoded are added to `skipped`."""
    store = blob_store(ctx.settings)
    ids: list[uuid.UUID] = []
    pixels: list[torch.Tensor] = []
    for face_id, sha256, _created in batch:
        try:
            pixels.append(decode_face(store, face_id, sha256, model.spec.size))
            ids.append(face_id)
        except (OSError, ImageDecodeError) as exc:
            log.warning("job %s: skipping %s", ctx.job.id, exc)
            skipped.add(face_id)
    if not ids:
        return []
    result = embed_pixels(model.backbone, model.spec, torch.stack(pixels), batch_size=len(ids))
    vectors = result.embeddings.numpy().astype(np.float32)
    now = utcnow()
    return [
        {
            "face_id": face_id,
            "model_id": model.id,
            "vector": vectors[i].tobytes(),
            "quality": float(result.norms[i]),
            "created_at": now,
        }
        for i, face_id in enumerate(ids)
    ]


def run(ctx: JobContext) -> dict[str, Any]:
    threads = ctx.settings.embed_torch_threads if ctx.job.kind == JobKind.EMBED else 0
    if threads <= 0:
        return _run(ctx)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(ctx)
    finally:
        torch.set_num_threads(before)


def _run(ctx: JobContext) -> dict[str, Any]:
    started = time.monotonic()
    # A reindex scans from the oldest face and counts what is missing; an embed job starts at the watermark.
    full = ctx.job.kind != JobKind.EMBED
    lag = timedelta(seconds=ctx.settings.embed_watermark_lag_s)
    ctx.progress(phase="loading", force=True)
    with ctx.session() as session:
        model = cached_model(ctx.settings, model_row(session, ctx.params.get("model")))
        recorded = _watermark(session, model.id)  # the watermark as stored, or as this pass last wrote it
        missing = missing_faces(session, model.id) if full else None
    batch_size = ctx.settings.reindex_batch_size
    skipped: set[uuid.UUID] = set()
    embedded = batches = chunks = 0
    if full:
        from worker.jobs.reindex_chunks import run_sharded

        sharded = run_sharded(ctx, model, missing)
        if sharded is not None:  # what is left is the final pass from the oldest face: arrivals, retries
            chunks, embedded, batches = sharded.chunks, sharded.embedded, sharded.batches
    shards = {"chunks": chunks, "chunks_done": chunks} if chunks else {}
    generation: int | None = None
    wrote_watermark = pending = False  # whether a batch recorded the watermark; whether it moved since
    # Every face at or before `covered` is embedded or skipped (a gapless stretch from the oldest face);
    # the scan goes on from `cursor`.
    covered = recorded
    cursor: Cursor | None = None if full else recorded
    ctx.progress(
        phase="embedding",
        missing=missing,
        embedded=embedded,
        skipped=0,
        batches=batches,
        force=True,
        **shards,
    )
    while True:
        ctx.raise_if_cancelled(f"after {embedded} faces")
        asked = utcnow()
        with ctx.session() as session:
            batch = _missing_batch(session, model.id, cursor, skipped, batch_size)
        # What this query shows once its faces are embedded (or skipped): every face after `cursor` that had
        # committed when it ran is covered, up to its last face, or to the end when it was not full. A face
        # created less than `lag` before the query may not have committed yet: the claim stops before those.
        shown = _position(batch[-1]) if len(batch) == batch_size else None
        ceiling: Cursor = (asked - lag, NIL)
        reach = ceiling if shown is None or shown > ceiling else shown
        if not _after(cursor, covered) and _after(reach, covered):
            covered, pending = reach, pending or bool(batch)
        if not batch:
            if full and cursor is not None:
                cursor = None  # one more look from the start, for faces committed behind the cursor
                continue
            break  # an embed job leaves faces committed behind its cursor to the job their upload queued
        cursor = _position(batch[-1])
        rows = _embed_rows(ctx, model, batch, skipped)
        if rows:
            advance = covered if _after(covered, recorded) else None
            written, batch_generation = _write(ctx, model.id, rows, advance)
            embedded += written
            generation = batch_generation or generation
            if batch_generation is not None and advance is not None:
                recorded, wrote_watermark, pending = advance, True, False
        batches += 1
        ctx.progress(
            phase="embedding",
            missing=missing,
            embedded=embedded,
            skipped=len(skipped),
            batches=batches,
            force=batches == 1,
            **shards,
        )
    # An embed job whose batches recorded the watermark leaves it there: its last, empty, query moved it on by
    # moments only. Otherwise (a reindex; an embed job that found its faces embedded by the one before, or
    # could decode none of them) the pass records it in a transaction of its own.
    if covered is not None and _after(covered, recorded) and (full or pending or not wrote_watermark):
        with ctx.session() as session:
            _advance_watermark(session, model.id, covered)
    with ctx.session() as session:
        if full:
            still_missing: int = missing_faces(session, model.id)
            complete: bool | None = still_missing == 0
            if complete:
                complete = mark_embedded_if_complete(session, model.id) is not False  # None: nothing to mark
        else:
            # Faces since the watermark that the pass left missing: the ones it could not decode.
            still_missing = len(skipped)
            complete = False if skipped else mark_embedded_if_complete(session, model.id)
    ctx.progress(
        phase="done",
        missing=missing,
        embedded=embedded,
        skipped=len(skipped),
        batches=batches,
        force=True,
        **shards,
    )
    log.info(
        "job %s: model %s embedded %d faces in %d batches (%d skipped, %d still missing)",
        ctx.job.id,
        model.id,
        embedded,
        batches,
        len(skipped),
        still_missing,
    )
    return {
        "model_id": str(model.id),
        "missing": missing,
        "embedded": embedded,
        "skipped": len(skipped),
        "still_missing": still_missing,
        "batches": batches,
        "chunks": chunks,
        "generation": generation,
        "complete": complete,
        "seconds": round(time.monotonic() - started, 3),
    }
