"""reindex: embed every stored face with one model, keyed by (face, model).

Embeddings of other models are left alone: the previous model's stay usable until this model's set is
complete and something switches over. Each batch is committed on its own, so a cancelled or interrupted
reindex keeps what it wrote and a rerun simply overwrites. A face whose image cannot be decoded is skipped and
counted, not allowed to stop everyone else's.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import numpy as np
import torch
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.tables import Face, FaceEmbedding, utcnow
from worker.jobs.data import decode_face
from worker.jobs.registry import blob_store, load_model, model_row
from worker.ml.embedding import embed_pixels, select_device
from worker.ml.preprocessing import ImageDecodeError
from worker.runtime import JobContext

log = logging.getLogger(__name__)


def _upsert(session: Session, rows: list[dict[str, Any]]) -> None:
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    statement = insert(FaceEmbedding).values(rows)
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["face_id", "model_id"],
            set_={
                "vector": statement.excluded.vector,
                "quality": statement.excluded.quality,
                "created_at": statement.excluded.created_at,
            },
        )
    )


def _write(ctx: JobContext, rows: list[dict[str, Any]]) -> int:
    """Upsert a batch and return its size; faces deleted meanwhile are dropped on a retry."""
    for attempt in range(2):
        try:
            with ctx.session() as session:
                if attempt:
                    alive = set(
                        session.scalars(select(Face.id).where(Face.id.in_([r["face_id"] for r in rows])))
                    )
                    rows = [r for r in rows if r["face_id"] in alive]
                if rows:
                    _upsert(session, rows)
            return len(rows)
        except IntegrityError:
            if attempt:
                raise
            log.info("job %s: a face was deleted during the batch; retrying without it", ctx.job.id)
    return 0


def run(ctx: JobContext) -> dict[str, Any]:
    started = time.monotonic()
    ctx.progress(phase="loading", force=True)
    with ctx.session() as session:
        model = load_model(ctx.settings, model_row(session, ctx.params.get("model")))
        faces = session.execute(select(Face.id, Face.sha256).order_by(Face.created_at, Face.id)).all()
    store = blob_store(ctx.settings)
    device = select_device()
    model.backbone.to(device)
    batch_size = ctx.settings.reindex_batch_size
    steps = -(-len(faces) // batch_size)
    embedded = skipped = 0
    for step, start in enumerate(range(0, len(faces), batch_size), start=1):
        ctx.raise_if_cancelled(f"after {embedded} of {len(faces)} faces")
        ids: list[uuid.UUID] = []
        pixels: list[torch.Tensor] = []
        for face_id, sha256 in faces[start : start + batch_size]:
            try:
                pixels.append(decode_face(store, face_id, sha256, model.spec.size))
                ids.append(face_id)
            except (OSError, ImageDecodeError) as exc:
                log.warning("job %s: skipping %s", ctx.job.id, exc)
                skipped += 1
        if ids:
            result = embed_pixels(model.backbone, model.spec, torch.stack(pixels), batch_size=batch_size)
            vectors = result.embeddings.numpy().astype(np.float32)
            now = utcnow()
            rows = [
                {
                    "face_id": face_id,
                    "model_id": model.id,
                    "vector": vectors[i].tobytes(),
                    "quality": float(result.norms[i]),
                    "created_at": now,
                }
                for i, face_id in enumerate(ids)
            ]
            embedded += _write(ctx, rows)
        ctx.progress(
            phase="embedding",
            step=step,
            steps=steps,
            faces=len(faces),
            embedded=embedded,
            skipped=skipped,
            force=step in (1, steps),
        )
    return {
        "model_id": str(model.id),
        "faces": len(faces),
        "embedded": embedded,
        "skipped": skipped,
        "seconds": round(time.monotonic() - started, 3),
    }
