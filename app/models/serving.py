"""Which model answers verify and search, and keeping every face embedded by the models in service.

The active model is the latest activation's. The serving model is the latest activated model whose
embeddings covered every face (blue/green): after an activation the previous model keeps serving until the
new one's reindex completes, so no answer ever mixes two models or reads a half-embedded set. Faces stored
later are embedded on arrival by a coalesced `embed` job per model.
"""

import uuid

from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.domain import JobKind
from app.jobs.params import EmbedParams
from app.jobs.submission import add_coalesced_job
from app.tables import Activation, Face, FaceEmbedding, ModelVersion, utcnow


def serving_activation(session: Session) -> Activation | None:
    statement = (
        select(Activation)
        .where(Activation.embedded_at.is_not(None))
        .order_by(Activation.created_at.desc(), Activation.id.desc())
        .limit(1)
    )
    return session.scalars(statement).first()


def serving_model(session: Session) -> ModelVersion | None:
    activation = serving_activation(session)
    return session.get(ModelVersion, activation.model_id) if activation is not None else None


def models_in_service(session: Session) -> list[uuid.UUID]:
    """The active model and, while a switch is under way, the serving one: the models new faces need."""
    latest = select(Activation.model_id).order_by(Activation.created_at.desc(), Activation.id.desc()).limit(1)
    active = session.scalar(latest)
    serving = serving_activation(session)
    models = [active] if active is not None else []
    if serving is not None and serving.model_id not in models:
        models.append(serving.model_id)
    return models


def missing_faces(session: Session, model_id: uuid.UUID) -> int:
    """How many stored faces have no embedding by `model_id`."""
    embedded = exists().where(FaceEmbedding.face_id == Face.id, FaceEmbedding.model_id == model_id)
    return int(session.scalar(select(func.count()).select_from(Face).where(~embedded)) or 0)


def any_face_missing(session: Session, model_id: uuid.UUID) -> bool:
    """Whether some stored face has no embedding by `model_id` (stops at the first one it finds)."""
    embedded = exists().where(FaceEmbedding.face_id == Face.id, FaceEmbedding.model_id == model_id)
    return bool(session.scalar(select(exists().where(~embedded).select_from(Face))))


def mark_embedded_if_complete(session: Session, model_id: uuid.UUID) -> bool | None:
    """Record that `model_id` embeds every face, on each of its activations not yet marked.

    Returns whether the model covers every face, or None when it did not look: the model has no activation
    left unmarked (never activated, or every activation marked already), so there is nothing to record and
    the check over every face, the costly part, is skipped. The cheap look for an unmarked activation uses
    `ix_activations_model_id`; an activation is marked once, so the full check runs until then only.

    Called at the end of each embedding pass and on activation: the first call that finds nothing missing
    switches the serving model to it (when its activation is the latest one marked).
    """
    unmarked = exists().where(Activation.model_id == model_id, Activation.embedded_at.is_(None))
    if not session.scalar(select(unmarked)):
        return None
    if any_face_missing(session, model_id):
        return False
    session.execute(
        update(Activation)
        .where(Activation.model_id == model_id, Activation.embedded_at.is_(None))
        .values(embedded_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return True


def request_embedding(session: Session, settings: Settings) -> list[uuid.UUID]:
    """Queue an embedding job for each model in service unless one is queued already; the ids added.

    Call in a transaction of its own after the faces are committed: a queued job that a worker claims later
    then sees them, and one that is already running is followed by a new queued one. Commits.
    """
    added = [
        job_id
        for model_id in models_in_service(session)
        if (
            job_id := add_coalesced_job(
                session=session,
                settings=settings,
                kind=JobKind.EMBED,
                params=EmbedParams(model=model_id),
                key=embed_job_key(model_id),
            )
        )
        is not None
    ]
    session.commit()
    return added


def embed_job_key(model_id: uuid.UUID) -> str:
    return f"{JobKind.EMBED.value}:{model_id}"
