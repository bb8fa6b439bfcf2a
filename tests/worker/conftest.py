"""Fixtures for the worker's job tests: a blob store, and the broker's sends captured.

Jobs run in-process here (no broker, no worker process), on the PostgreSQL fixtures of tests/conftest.py.
"""

import uuid

import pytest

from app.blobs import BlobStore
from app.config import Settings


@pytest.fixture
def store(settings: Settings) -> BlobStore:
    return BlobStore(settings.blob_dir)


@pytest.fixture
def sent_jobs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[uuid.UUID, str]]:
    """(job id, kind) of every job sent to the broker after its commit, instead of sending it."""
    from app.jobs import submission

    sent: list[tuple[uuid.UUID, str]] = []

    def capture(_settings: Settings, job_id: uuid.UUID, kind: str) -> bool:
        sent.append((job_id, kind))
        return True

    monkeypatch.setattr(submission, "try_enqueue_job", capture)
    return sent
