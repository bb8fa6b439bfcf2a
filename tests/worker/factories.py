"""Rows for the worker's job tests, added in the caller's session as the api would have written them, and a
job run to its end in-process."""

import hashlib
import io
import itertools
import uuid
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.blobs import BlobStore
from app.config import Settings
from app.splits import split_for_digest
from app.tables import Face, FeedbackPair, Job, ModelVersion
from worker.ml.preprocessing import preprocess_spec_for
from worker.runtime import Outcome, Timings, run_job

TIMINGS = Timings(heartbeat_interval_s=5.0, progress_interval_s=0.1, cancel_check_interval_s=0.5)


def add_face(
    session: Session, store: BlobStore, data: bytes, config: Settings, subject: str | None = None
) -> Face:
    """A face row with its image in the blob store, split by its content hash as the api does it."""
    blob = store.write_stream("faces", [data])
    with Image.open(io.BytesIO(data)) as image:
        width, height, channels = image.width, image.height, len(image.getbands())
    face = Face(
        sha256=blob.sha256,
        byte_size=blob.size,
        media_type="image/png",
        width=width,
        height=height,
        channels=channels,
        split=split_for_digest(blob.sha256, config.split_fractions),
        subject=subject,
    )
    session.add(face)
    session.flush()
    return face


def add_pair(session: Session, a: Face, b: Face, label: int, split: str | None = None) -> FeedbackPair:
    first, second = (a, b) if a.id < b.id else (b, a)
    if split is None:
        split = first.split if first.split == second.split else "cross"
    pair = FeedbackPair(face_a=first.id, face_b=second.id, label=label, split=split)
    session.add(pair)
    return pair


def _unregistered_copy(session: Session, checkpoint: Path, arch: str) -> bytes:
    """The checkpoint's bytes, or, when they are registered under `arch` already (one model per bytes and
    arch), the same weights in MagFace's wrapper with another `epoch`, so a test can have two models."""
    content = checkpoint.read_bytes()
    for copy in itertools.count(1):
        digest = hashlib.sha256(content).hexdigest()
        taken = select(ModelVersion.id).where(ModelVersion.sha256 == digest, ModelVersion.arch == arch)
        if session.scalars(taken).first() is None:
            return content
        payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
        wrapped = dict(payload) if "state_dict" in payload else {"state_dict": payload, "arch": arch}
        buffer = io.BytesIO()
        torch.save({**wrapped, "epoch": copy}, buffer)
        content = buffer.getvalue()
    raise AssertionError("unreachable")


def add_model(
    session: Session,
    store: BlobStore,
    checkpoint: Path,
    arch: str,
    *,
    status: str = "validating",
    threshold: float | None = None,
    name: str | None = None,
) -> ModelVersion:
    blob = store.write_stream("checkpoints", [_unregistered_copy(session, checkpoint, arch)])
    model = ModelVersion(
        name=name, arch=arch, status=status, sha256=blob.sha256, byte_size=blob.size, threshold=threshold
    )
    session.add(model)
    session.flush()
    return model


def add_job(session: Session, kind: str, params: dict[str, Any], **fields: Any) -> Job:
    job = Job(kind=kind, params=params, **{"status": "queued", "attempts": 0, "max_attempts": 3, **fields})
    session.add(job)
    session.flush()
    return job


def add_ready_base(
    session: Session, store: BlobStore, checkpoint: Path, threshold: float | None = None
) -> ModelVersion:
    """The MobileFaceNet checkpoint registered as a ready model, as validate_model leaves it."""
    model = add_model(
        session, store, checkpoint, "mobilefacenet", status="ready", threshold=threshold, name="base"
    )
    model.embedding_size = 128
    model.preprocess = preprocess_spec_for("mobilefacenet").to_dict()
    return model


def get_job(session: Session, job_id: uuid.UUID) -> Job:
    job = session.get(Job, job_id)
    assert job is not None
    return job


def run_in_process(settings: Settings, job_id: uuid.UUID, timings: Timings = TIMINGS) -> Outcome:
    outcome = run_job(job_id, settings=settings, worker_name="test-worker", timings=timings)
    assert outcome is not None
    return outcome
