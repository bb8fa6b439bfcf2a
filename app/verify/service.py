"""Scores between stored embeddings of the serving model, in float64 from the stored float32 vectors.

Only the serving model's vectors are read, so an answer never mixes two models, and a face it has not
embedded yet is a 409 with `Retry-After` rather than a guess.
"""

import uuid

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.embeddings import (
    decode_vector,
    not_embedded,
    require_faces,
    require_serving_model,
    vectors_of,
    verdict,
)
from app.problems import Problem
from app.tables import Face
from app.verify.schemas import PairVerdict, SubjectVerdict


def verify_pair(*, session: Session, face_a: uuid.UUID, face_b: uuid.UUID) -> PairVerdict:
    if face_a == face_b:
        raise Problem(422, "same-face", "Same face", "a face cannot be verified against itself")
    require_faces(session, [face_a, face_b], ["face_a", "face_b"])
    model = require_serving_model(session)
    vectors = vectors_of(session, model.id, [face_a, face_b])
    for face_id in (face_a, face_b):
        if face_id not in vectors:
            raise not_embedded(model.id, face=face_id)
    a = decode_vector(vectors[face_a]).astype(np.float64)
    b = decode_vector(vectors[face_b]).astype(np.float64)
    score = float(np.dot(a, b))
    same, reason = verdict(score, model.threshold)
    return PairVerdict(
        face_a=face_a,
        face_b=face_b,
        score=score,
        model_id=model.id,
        threshold=model.threshold,
        same=same,
        same_reason=reason,
    )


def verify_subject(*, session: Session, face: uuid.UUID, subject: str) -> SubjectVerdict:
    """The face against every other embedded face of the subject; `same` follows the best score."""
    require_faces(session, [face], ["face"])
    others = list(session.scalars(select(Face.id).where(Face.subject == subject, Face.id != face)))
    if not others:
        raise Problem(
            404,
            "unknown-subject",
            "Unknown subject",
            f"no face other than {face} has subject {subject!r}",
            subject=subject,
        )
    model = require_serving_model(session)
    query = vectors_of(session, model.id, [face]).get(face)
    if query is None:
        raise not_embedded(model.id, face=face)
    vectors = vectors_of(session, model.id, others)
    if not vectors:
        raise not_embedded(model.id, subject=subject)
    ids = list(vectors)
    matrix = np.frombuffer(b"".join(vectors[i] for i in ids), dtype="<f4").reshape(len(ids), -1)
    scores = matrix.astype(np.float64) @ decode_vector(query).astype(np.float64)
    best = int(np.argmax(scores))
    same, reason = verdict(float(scores[best]), model.threshold)
    return SubjectVerdict(
        face=face,
        subject=subject,
        best_score=float(scores[best]),
        best_face=ids[best],
        mean_score=float(scores.mean()),
        compared=len(ids),
        waiting=len(others) - len(ids),
        model_id=model.id,
        threshold=model.threshold,
        same=same,
        same_reason=reason,
    )
