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
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import numpy as np
import torch
from sqlalchemy import Row, exists, literal, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

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

Cursor = tuple[Any, uuid.UUID]  # (created_at, id) of the last face a query returned


def _insert(session: Session) -> Any:
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


def _missing_batch(
    session: Session, model_id: uuid.UUID, after: Cursor | None, skipped: set[uuid.UUID], limit: int
) -> list[Row[Any]]:
    """The next faces without an embedding by the model, in (created_at, id) order after `after`.

    The cursor keeps each query from rescanning the faces the pass has embedded already (on millions of faces,
    restarting from the oldest every batch would be quadratic); `after=None` starts from the oldest, which
    catches faces committed late with an earlier timestamp.
    """
    embedded = exists().where(FaceEmbedding.face_id == Face.id, FaceEmbedding.model_id == model_id)
    statement = select(Face.id, Face.sha256, Face.created_at).where(~embedded)
    if after is not None:
        last = tuple_(literal(after[0], Face.created_at.type), literal(after[1], Face.id.type))
        statement = statement.where(tuple_(Face.created_at, Face.id) > last)
    if skipped:
        statement = statement.where(Face.id.not_in(skipped))
    return list(session.execute(statement.order_by(Face.created_at, Face.id).limit(limit)).all())


def _bump_generation(session: Session, model_id: uuid.UUID) -> int:
    """Take the model's next generation; the row lock it holds until commit orders writers of one model."""
    table = EmbeddingGeneration
    statement = (
        _insert(session)(table)
        .values(model_id=model_id, generation=1)
        .on_conflict_do_update(index_elements=[table.model_id], set_={"generation": table.generation + 1})
        .returning(table.generation)
    )
    return int(session.execute(statement).scalar_one())


def _insert_rows(session: Session, rows: list[dict[str, Any]]) -> int:
    """Insert the rows that do not exist yet; how many were inserted."""
    statement = (
        _insert(session)(FaceEmbedding)
        .values(rows)
        .on_conflict_do_nothing(index_elements=[FaceEmbedding.face_id, FaceEmbedding.model_id])
        .returning(FaceEmbedding.face_id)
    )
    return len(session.execute(statement).all())


def _write(ctx: JobContext, model_id: uuid.UUID, rows: list[dict[str, Any]]) -> tuple[int, int | None]:
    """Write one batch in one transaction under a new generation: (rows inserted, generation).

    A face deleted since it was read makes the insert fail on its foreign key; the batch is then retried
    without the faces that are gone.
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
                return _insert_rows(session, [{**row, "generation": generation} for row in rows]), generation
        except IntegrityError:
            if attempt:
                raise
            log.info("job %s: a face was deleted during the batch; retrying without it", ctx.job.id)
    return 0, None


def _embed_rows(
    ctx: JobContext, model: LoadedModel, batch: list[Row[Any]], skipped: set[uuid.UUID]
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
    ctx.progress(phase="loading", force=True)
    with ctx.session() as session:
        model = cached_model(ctx.settings, model_row(session, ctx.params.get("model")))
        missing = missing_faces(session, model.id)
    batch_size = ctx.settings.reindex_batch_size
    skipped: set[uuid.UUID] = set()
    embedded = batches = 0
    generation: int | None = None
    cursor: Cursor | None = None
    ctx.progress(phase="embedding", missing=missing, embedded=0, skipped=0, batches=0, force=True)
    while True:
        ctx.raise_if_cancelled(f"after {embedded} of {missing} faces")
        with ctx.session() as session:
            batch = _missing_batch(session, model.id, cursor, skipped, batch_size)
        if not batch:
            if cursor is None:
                break  # nothing missing from the oldest face on: done
            cursor = None  # one more look from the start, for faces committed behind the cursor
            continue
        cursor = (batch[-1].created_at, batch[-1].id)
        rows = _embed_rows(ctx, model, batch, skipped)
        if rows:
            written, batch_generation = _write(ctx, model.id, rows)
            embedded += written
            generation = batch_generation or generation
        batches += 1
        ctx.progress(
            phase="embedding",
            missing=missing,
            embedded=embedded,
            skipped=len(skipped),
            batches=batches,
            force=batches == 1,
        )
    with ctx.session() as session:
        still_missing = missing_faces(session, model.id)
        complete = still_missing == 0 and mark_embedded_if_complete(session, model.id)
    ctx.progress(
        phase="done",
        missing=missing,
        embedded=embedded,
        skipped=len(skipped),
        batches=batches,
        force=True,
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
        "generation": generation,
        "complete": complete,
        "seconds": round(time.monotonic() - started, 3),
    }
