"""Stored embeddings as verify, search and the face pages read them: only ever the serving model's.

Vectors are stored as little-endian float32 bytes of the L2-normalised embedding; scores are their dot
product. A face stored after its model started serving is embedded shortly after (a coalesced `embed` job),
so "not embedded yet" is a transient 409 with `Retry-After`, never a guess from another model's vectors.
"""

import uuid
from collections.abc import Iterable

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models.serving import serving_activation, serving_model
from app.problems import Problem
from app.tables import Face, FaceEmbedding, ModelVersion

RETRY_AFTER_S = 5
NO_THRESHOLD = "the serving model has no calibrated threshold yet"


def decode_vector(raw: bytes) -> np.ndarray:
    """The stored float32 vector (read-only view over the bytes)."""
    return np.frombuffer(raw, dtype="<f4")


def serving_model_id(session: Session) -> uuid.UUID | None:
    activation = serving_activation(session)
    return activation.model_id if activation is not None else None


def require_serving_model(session: Session) -> ModelVersion:
    """The model whose embeddings answer, or a 409: before the first reindex completes, nothing can."""
    model = serving_model(session)
    if model is None:
        raise Problem(
            409,
            "no-serving-model",
            "No serving model",
            "no activated model has embedded every face yet; activate one and wait for its reindex",
        )
    return model


def require_faces(
    session: Session, face_ids: Iterable[uuid.UUID], names: Iterable[str]
) -> dict[uuid.UUID, Face]:
    """The faces by id, or a 404 `unknown-face` naming every missing one (by its request field)."""
    ids, fields = list(face_ids), list(names)
    found = {face.id: face for face in session.scalars(select(Face).where(Face.id.in_(ids)))}
    missing = [(field, face_id) for field, face_id in zip(fields, ids, strict=True) if face_id not in found]
    if missing:
        raise Problem(
            404,
            "unknown-face",
            "Unknown face",
            "; ".join(f"{field}: no face with id {face_id}" for field, face_id in missing),
            errors=[
                {"loc": ["body", field], "msg": "unknown face", "type": "unknown_face"}
                for field, _ in missing
            ],
        )
    return found


def vectors_of(
    session: Session, model_id: uuid.UUID, face_ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, bytes]:
    """The stored vectors of those faces that `model_id` has embedded."""
    ids = list(face_ids)
    if not ids:
        return {}
    statement = select(FaceEmbedding.face_id, FaceEmbedding.vector).where(
        FaceEmbedding.model_id == model_id, FaceEmbedding.face_id.in_(ids)
    )
    return {face_id: vector for face_id, vector in session.execute(statement)}


def embedding_qualities(
    session: Session, model_id: uuid.UUID | None, face_ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, float]:
    """The quality (MagFace's: the norm of the un-normalised embedding) of those faces `model_id` has
    embedded, in one query; a face missing from the answer is not embedded (none is when no model serves)."""
    ids = list(face_ids)
    if model_id is None or not ids:
        return {}
    statement = select(FaceEmbedding.face_id, FaceEmbedding.quality).where(
        FaceEmbedding.model_id == model_id, FaceEmbedding.face_id.in_(ids)
    )
    return {face_id: quality for face_id, quality in session.execute(statement)}


def not_embedded(
    model_id: uuid.UUID, *, face: uuid.UUID | None = None, subject: str | None = None
) -> Problem:
    """409 with `Retry-After`: the serving model has not embedded the face (or any of the subject's) yet."""
    what = f"face {face}" if face is not None else f"any face of subject {subject!r}"
    detail = f"the serving model {model_id} has not embedded {what} yet"
    extra: dict[str, str] = {"model_id": str(model_id)}
    if face is not None:
        extra["face_id"] = str(face)
    if subject is not None:
        extra["subject"] = subject
    return Problem(
        409,
        "not-embedded",
        "Not embedded yet",
        f"{detail}; retry in a few seconds",
        headers={"Retry-After": str(RETRY_AFTER_S)},
        **extra,
    )


def verdict(score: float, threshold: float | None) -> tuple[bool | None, str | None]:
    """(same, same_reason): same person at the model's calibrated threshold, or null with the reason."""
    if threshold is None:
        return None, NO_THRESHOLD
    return score >= threshold, None
