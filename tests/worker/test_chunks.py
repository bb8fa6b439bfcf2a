"""Sharded reindex bookkeeping on PostgreSQL and SQLite: planning chunks over the missing faces, claiming them
atomically, the ownership rule, and the sweeper's handling of chunks whose worker died."""

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from app import migrate
from app.config import Settings
from app.db import get_engine, session_scope
from app.domain import JobStatus
from app.jobs.sweeper import sweep_once
from app.tables import FaceEmbedding, Job, JobChunk, ModelVersion, utcnow
from tests.app.factories import face_row
from tests.queues import QueueProbe
from worker.chunk_claims import claim_chunk, claim_next_chunk, finish_chunk
from worker.jobs.reindex import _missing_batch
from worker.jobs.reindex_chunks import plan_chunks


@pytest.fixture(params=["postgresql", "sqlite"])
def db_settings(request: pytest.FixtureRequest, tmp_path: Path, broker: QueueProbe) -> Iterator[Settings]:
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_database")
    else:
        url = f"sqlite:///{tmp_path / 'magtune.db'}"
    migrate.upgrade_database(url)
    yield Settings(
        database_url=url,
        broker_url=broker.url,
        queue_name=broker.name,
        embed_queue_name=broker.embed_name,
        data_dir=tmp_path / "data",
        job_heartbeat_timeout_s=60,
    )
    get_engine(url).dispose()


def _seed(settings: Settings, faces: int, embedded: int) -> tuple[uuid.UUID, uuid.UUID, list[uuid.UUID]]:
    """A model, `faces` faces a second apart (the first `embedded` of them embedded) and a running reindex."""
    start = utcnow() - timedelta(hours=1)
    with session_scope(settings.database_url) as session:
        model = ModelVersion(arch="mobilefacenet", status="ready", sha256=uuid.uuid4().hex * 2, byte_size=1)
        session.add(model)
        rows = []
        for i in range(faces):
            face = face_row()
            face.created_at = start + timedelta(seconds=i)
            rows.append(face)
        session.add_all(rows)
        session.flush()
        for face in rows[:embedded]:
            session.add(FaceEmbedding(face_id=face.id, model_id=model.id, vector=b"\0" * 512, quality=1.0))
        job = Job(kind="reindex", params={}, status=JobStatus.RUNNING, attempts=1, max_attempts=3)
        session.add(job)
        session.flush()
        return model.id, job.id, [face.id for face in rows]


def _chunk_faces(settings: Settings, model_id: uuid.UUID, job_id: uuid.UUID) -> list[list[uuid.UUID]]:
    """The missing faces in each chunk's range, in chunk order."""
    with session_scope(settings.database_url) as session:
        chunks = session.scalars(select(JobChunk).where(JobChunk.job_id == job_id).order_by(JobChunk.seq))
        ranges = [
            (
                (c.lo_created_at, c.lo_id) if c.lo_id else None,
                (c.hi_created_at, c.hi_id) if c.hi_id else None,
            )
            for c in chunks
        ]
        return [
            [row.id for row in _missing_batch(session, model_id, lo, set(), 10_000, until=hi)]
            for lo, hi in ranges
        ]


def test_chunks_cover_every_missing_face_once_in_ranges_of_the_chunk_size(db_settings: Settings) -> None:
    model_id, job_id, faces = _seed(db_settings, faces=11, embedded=3)
    with session_scope(db_settings.database_url) as session:
        assert plan_chunks(session, job_id, model_id, chunk_size=3, max_attempts=2) == 3

    parts = _chunk_faces(db_settings, model_id, job_id)
    assert [len(part) for part in parts] == [3, 3, 2]
    assert [face for part in parts for face in part] == faces[3:], "every missing face, once, in order"
    with session_scope(db_settings.database_url) as session:
        statuses = session.execute(select(JobChunk.status, JobChunk.attempts, JobChunk.max_attempts)).all()
        assert {tuple(row) for row in statuses} == {("queued", 0, 2)}
        # A re-run of the job keeps its plan.
        assert plan_chunks(session, job_id, model_id, chunk_size=2, max_attempts=2) == 3
        assert session.scalar(select(JobChunk.id).where(JobChunk.seq == 3)) is None


def test_a_face_stored_after_planning_falls_in_the_open_last_chunk(db_settings: Settings) -> None:
    model_id, job_id, faces = _seed(db_settings, faces=6, embedded=0)
    with session_scope(db_settings.database_url) as session:
        assert plan_chunks(session, job_id, model_id, chunk_size=3, max_attempts=3) == 2
        late = face_row()
        session.add(late)
        session.flush()
        late_id = late.id
    assert _chunk_faces(db_settings, model_id, job_id) == [faces[:3], [*faces[3:], late_id]]


@pytest.mark.parametrize(("faces", "embedded"), [(5, 0), (8, 3), (3, 3)])
def test_a_reindex_of_at_most_one_chunk_is_not_split(
    db_settings: Settings, faces: int, embedded: int
) -> None:
    model_id, job_id, _faces = _seed(db_settings, faces=faces, embedded=embedded)
    with session_scope(db_settings.database_url) as session:
        assert plan_chunks(session, job_id, model_id, chunk_size=5, max_attempts=3) == 0
        assert session.scalar(select(JobChunk.id)) is None


def test_a_chunk_is_claimed_once_and_only_while_its_job_runs(db_settings: Settings) -> None:
    model_id, job_id, _faces = _seed(db_settings, faces=9, embedded=0)
    with session_scope(db_settings.database_url) as session:
        plan_chunks(session, job_id, model_id, chunk_size=3, max_attempts=3)
        first = session.scalar(select(JobChunk.id).where(JobChunk.seq == 0))
        assert first is not None
    with session_scope(db_settings.database_url) as session:
        won = claim_chunk(session, first, "a@host:1")
        assert won is not None and (won.seq, won.attempt, won.worker) == (0, 1, "a@host:1")
        assert claim_chunk(session, first, "b@host:2") is None, "a claimed chunk is not claimed again"
        others = [claim_next_chunk(session, job_id, name) for name in ("b@host:2", "c@host:3", "d@host:4")]
        assert [c.seq if c else None for c in others] == [1, 2, None]

    # The attempt that lost its chunk to a retry writes nothing.
    engine = get_engine(db_settings.database_url)
    with engine.begin() as connection:
        connection.execute(
            update(JobChunk).where(JobChunk.id == first).values(status=JobStatus.QUEUED, worker=None)
        )
    with session_scope(db_settings.database_url) as session:
        retry = claim_chunk(session, first, "b@host:2")
    assert retry is not None and retry.attempt == 2
    assert not finish_chunk(engine, won, JobStatus.SUCCEEDED, progress={"embedded": 3})
    assert finish_chunk(engine, retry, JobStatus.SUCCEEDED, progress={"embedded": 3})

    # No chunk is taken for a job being cancelled, or one that is not running.
    model_id, other_job, _ = _seed(db_settings, faces=0, embedded=0)
    with session_scope(db_settings.database_url) as session:
        session.add(JobChunk(job_id=other_job, seq=0, model_id=model_id, max_attempts=3, attempts=0))
    for values in ({"cancel_requested": True}, {"status": JobStatus.QUEUED}):
        with engine.begin() as connection:
            connection.execute(update(Job).where(Job.id == other_job).values(**values))
        with session_scope(db_settings.database_url) as session:
            assert claim_next_chunk(session, other_job, "a@host:1") is None


def test_the_sweeper_requeues_a_dead_workers_chunk_alone_and_fails_it_at_its_attempt_cap(
    db_settings: Settings, broker: QueueProbe
) -> None:
    model_id, job_id, _faces = _seed(db_settings, faces=9, embedded=0)
    with session_scope(db_settings.database_url) as session:
        plan_chunks(session, job_id, model_id, chunk_size=3, max_attempts=2)
        chunks = [claim_next_chunk(session, job_id, f"w@host:{i}") for i in range(2)]
    assert all(chunks)
    stale = utcnow() - timedelta(seconds=120)
    engine = get_engine(db_settings.database_url)
    with engine.begin() as connection:  # the worker of chunk 0 died; chunk 1's is alive
        connection.execute(update(JobChunk).where(JobChunk.seq == 0).values(heartbeat_at=stale))

    report = sweep_once(db_settings)
    assert report.chunks_requeued == [chunks[0].id] and report.chunks_failed == []
    assert broker.sent_job_ids() == [str(chunks[0].id)], "the requeued chunk is sent to the queue again"
    with session_scope(db_settings.database_url) as session:
        rows = {c.seq: (c.status, c.attempts, c.worker) for c in session.scalars(select(JobChunk))}
        assert rows[0] == ("queued", 1, None)
        assert rows[1] == ("running", 1, "w@host:1")
        again = claim_chunk(session, chunks[0].id, "x@host:9")
    assert again is not None and again.attempt == 2
    with engine.begin() as connection:
        connection.execute(update(JobChunk).where(JobChunk.seq == 0).values(heartbeat_at=stale))
    report = sweep_once(db_settings)
    assert report.chunks_failed == [chunks[0].id] and report.chunks_requeued == []
    with session_scope(db_settings.database_url) as session:
        failed = session.scalar(select(JobChunk).where(JobChunk.seq == 0))
        assert failed is not None and failed.status == "failed" and failed.error["type"] == "worker-lost"


def test_the_sweeper_closes_the_chunks_of_a_job_that_has_ended(db_settings: Settings) -> None:
    model_id, job_id, _faces = _seed(db_settings, faces=9, embedded=0)
    with session_scope(db_settings.database_url) as session:
        plan_chunks(session, job_id, model_id, chunk_size=3, max_attempts=3)
        dead = claim_next_chunk(session, job_id, "w@host:1")
    assert dead is not None
    with get_engine(db_settings.database_url).begin() as connection:
        connection.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.FAILED))
        connection.execute(
            update(JobChunk)
            .where(JobChunk.id == dead.id)
            .values(heartbeat_at=utcnow() - timedelta(minutes=5))
        )

    report = sweep_once(db_settings)
    assert report.chunks_requeued == [] and report.chunks_failed == []
    with session_scope(db_settings.database_url) as session:
        assert set(session.scalars(select(JobChunk.status))) == {"cancelled"}
