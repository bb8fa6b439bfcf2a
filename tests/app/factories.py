"""Rows written and read straight through the database, bypassing the api, to set up and check api tests."""

import hashlib
import uuid
from typing import Any

from sqlalchemy import func, select

from app.config import Settings
from app.db import session_scope
from app.tables import Activation, Face, Job, ModelVersion


def insert_model(
    settings: Settings, *, status: str = "ready", arch: str = "mobilefacenet", threshold: float | None = None
) -> uuid.UUID:
    with session_scope(settings.database_url) as session:
        model = ModelVersion(
            arch=arch, status=status, sha256=uuid.uuid4().hex * 2, byte_size=1234, threshold=threshold
        )
        session.add(model)
        session.flush()
        return model.id


def activate_directly(settings: Settings, model_id: uuid.UUID) -> None:
    with session_scope(settings.database_url) as session:
        session.add(Activation(model_id=model_id, actor="test"))


def insert_job(settings: Settings, **values: Any) -> uuid.UUID:
    values.setdefault("kind", "finetune")
    values.setdefault("params", {})
    with session_scope(settings.database_url) as session:
        job = Job(**values)
        session.add(job)
        session.flush()
        return job.id


def read_job(settings: Settings, job_id: uuid.UUID) -> Job:
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        session.expunge(job)
        return job


def face_row(
    *, split: str = "train", subject: str | None = None, source: str | None = None, byte_size: int = 1
) -> Face:
    """A face without an upload: a 112×112 PNG's metadata under a random digest, not yet added."""
    return Face(
        sha256=hashlib.sha256(uuid.uuid4().bytes).hexdigest(),
        byte_size=byte_size,
        media_type="image/png",
        width=112,
        height=112,
        channels=3,
        split=split,
        subject=subject,
        source=source,
    )


def insert_face(settings: Settings, *, split: str = "train", subject: str | None = None) -> uuid.UUID:
    """A face row without an upload, for tests that need many faces with chosen splits."""
    with session_scope(settings.database_url) as session:
        face = face_row(split=split, subject=subject)
        session.add(face)
        session.flush()
        return face.id


def count_rows(settings: Settings, table: type) -> int:
    with session_scope(settings.database_url) as session:
        return session.scalar(select(func.count()).select_from(table)) or 0
