"""Fixtures for the worker's job tests: the api's PostgreSQL fixtures, a blob store, and row factories.

Jobs run in-process here (no broker, no worker process); sends to the broker are captured instead.
"""

import hashlib
import io
import json
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy.orm import Session

from app.blobs import BlobStore
from app.config import Settings
from app.splits import split_for_digest
from app.tables import Face, FeedbackPair, Job, ModelVersion
from tests.app.conftest import _empty_tables, postgres_url, redis_url, settings  # noqa: F401


@pytest.fixture
def store(settings: Settings) -> BlobStore:  # noqa: F811
    return BlobStore(settings.blob_dir)


@pytest.fixture
def sent_jobs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[uuid.UUID, str]]:
    """(job id, kind) of every job sent to the broker after its commit, instead of sending it."""
    from app.jobs import service as jobs_service

    sent: list[tuple[uuid.UUID, str]] = []

    def capture(_settings: Settings, job_id: uuid.UUID, kind: str) -> bool:
        sent.append((job_id, kind))
        return True

    monkeypatch.setattr(jobs_service, "try_enqueue_job", capture)
    return sent


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
    blob = store.write_stream("checkpoints", [checkpoint.read_bytes()])
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


def johns_images(
    johns_dir: Path, people: Iterable[str] | None = None, per_person: int | None = None
) -> dict[str, list[Path]]:
    folder = johns_dir / "aligned_112"
    names = sorted(people) if people is not None else sorted(p.name for p in folder.iterdir() if p.is_dir())
    return {name: sorted((folder / name).glob("*.png"))[:per_person] for name in names}


def johns_labels(johns_dir: Path) -> dict[frozenset[str], int]:
    """Label of each pair in the shared pairs file, keyed by the two images' sha256."""
    digests: dict[str, str] = {}

    def digest(relative: str) -> str:
        if relative not in digests:
            digests[relative] = hashlib.sha256((johns_dir / relative).read_bytes()).hexdigest()
        return digests[relative]

    rows = json.loads((johns_dir / "pairs.json").read_text())
    return {frozenset((digest(r["image1"]), digest(r["image2"]))): int(r["label"]) for r in rows}
