"""Embeddings written straight into the database as the worker writes them, for verify and search tests.

Vectors are random unit vectors (float32, little-endian); every batch bumps the model's generation, as the
worker's writers do, and a model starts serving when its activation gets `embedded_at`.
"""

import uuid
from collections.abc import Sequence

import numpy as np
from sqlalchemy import select

from app.config import Settings
from app.db import session_scope
from app.tables import Activation, EmbeddingGeneration, FaceEmbedding, ModelVersion, utcnow
from tests.app.factories import face_row


def unit_vectors(rng: np.random.Generator, n: int, dim: int = 32) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def insert_faces(
    settings: Settings, subjects: Sequence[str | None], sources: Sequence[str | None] | None = None
) -> list[uuid.UUID]:
    sources = sources if sources is not None else [None] * len(subjects)
    with session_scope(settings.database_url) as session:
        faces = [
            face_row(subject=subject, source=source)
            for subject, source in zip(subjects, sources, strict=True)
        ]
        session.add_all(faces)
        session.flush()
        return [face.id for face in faces]


def embed(settings: Settings, model_id: uuid.UUID, faces: Sequence[uuid.UUID], vectors: np.ndarray) -> int:
    """Write one batch of embeddings under the model's next generation, as a worker does; that generation."""
    with session_scope(settings.database_url) as session:
        row = session.scalar(
            select(EmbeddingGeneration).where(EmbeddingGeneration.model_id == model_id).with_for_update()
        )
        if row is None:
            row = EmbeddingGeneration(model_id=model_id, generation=0)
            session.add(row)
        row.generation += 1
        for face_id, vector in zip(faces, vectors, strict=True):
            session.merge(
                FaceEmbedding(
                    face_id=face_id,
                    model_id=model_id,
                    vector=np.asarray(vector, "<f4").tobytes(),
                    quality=1.0,
                    generation=row.generation,
                )
            )
        return row.generation


def activate(settings: Settings, model_id: uuid.UUID, *, serving: bool) -> uuid.UUID:
    """An activation of the model; `serving`: its embeddings already cover every face (embedded_at set)."""
    with session_scope(settings.database_url) as session:
        activation = Activation(model_id=model_id, actor="test", embedded_at=utcnow() if serving else None)
        session.add(activation)
        session.flush()
        return activation.id


def mark_serving(settings: Settings, activation_id: uuid.UUID) -> None:
    with session_scope(settings.database_url) as session:
        session.get(Activation, activation_id).embedded_at = utcnow()


def set_threshold(settings: Settings, model_id: uuid.UUID, threshold: float | None) -> None:
    with session_scope(settings.database_url) as session:
        session.get(ModelVersion, model_id).threshold = threshold
