"""The embedding pass (`reindex` and `embed` jobs) in-process against real PostgreSQL, the MobileFaceNet
checkpoint and the johns faces: only missing faces, one generation per batch, resumable, arrivals taken."""

import re
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Engine, delete, event, select, update
from sqlalchemy.orm import Session

from app.blobs import BlobStore
from app.config import Settings
from app.db import session_scope
from app.models.serving import serving_model
from app.tables import Activation, EmbeddingGeneration, Face, FaceEmbedding, Job, JobChunk, utcnow
from tests.queues import QueueProbe
from tests.worker.factories import TIMINGS, add_face, add_job, add_ready_base, get_job, run_in_process
from tests.worker.johns import johns_images
from worker.chunk_runtime import ChunkContext
from worker.jobs import model_cache, reindex_chunks
from worker.jobs import reindex as embedding_pass
from worker.runtime import Timings

# Cancellation is read before every batch, so a test can stop the pass exactly after its first one.
EVERY_BATCH = Timings(heartbeat_interval_s=5.0, progress_interval_s=0.0, cancel_check_interval_s=0.0)


def _images(johns_dir: Path, count: int) -> list[bytes]:
    paths = [p for group in johns_images(johns_dir).values() for p in group]
    distinct = list(dict.fromkeys(p.read_bytes() for p in paths))
    return distinct[:count]


def _generations(settings: Settings, model_id: uuid.UUID) -> dict[int, int]:
    """Rows of the model per generation."""
    with session_scope(settings.database_url) as session:
        rows = session.scalars(select(FaceEmbedding.generation).where(FaceEmbedding.model_id == model_id))
        return dict(sorted(Counter(rows).items()))


def _counter(settings: Settings, model_id: uuid.UUID) -> int | None:
    with session_scope(settings.database_url) as session:
        row = session.get(EmbeddingGeneration, model_id)
        return row.generation if row is not None else None


def _after_each_write(monkeypatch: pytest.MonkeyPatch, hook: Callable[[int], None]) -> None:
    """Call hook(batch number) after each batch the pass writes."""
    write = embedding_pass._write
    calls = 0

    def spied(*args: Any) -> tuple[int, int | None]:
        nonlocal calls
        written = write(*args)
        calls += 1
        hook(calls)
        return written

    monkeypatch.setattr(embedding_pass, "_write", spied)


def test_reindex_embeds_only_missing_faces_one_generation_per_batch_and_a_rerun_writes_nothing(
    settings: Settings, store: BlobStore, johns_dir: Path, mobilefacenet_checkpoint: Path
) -> None:
    settings.reindex_batch_size = 4
    images = _images(johns_dir, 10)
    with session_scope(settings.database_url) as session:
        base = add_ready_base(session, store, mobilefacenet_checkpoint)
        older = add_ready_base(session, store, mobilefacenet_checkpoint)
        faces = [add_face(session, store, data, settings) for data in images]
        broken = add_face(session, store, images[0][:300], settings)
        kept = b"\1" * 512  # an existing row is never recomputed: its bytes stay what they were
        session.add(FaceEmbedding(face_id=faces[0].id, model_id=base.id, vector=kept, quality=1.0))
        session.add(FaceEmbedding(face_id=faces[1].id, model_id=older.id, vector=b"\0" * 512, quality=1.0))
        job = add_job(session, "reindex", {"model": str(base.id)})

    assert run_in_process(settings, job.id).status == "succeeded"
    with session_scope(settings.database_url) as session:
        done = get_job(session, job.id)
        result, progress = done.result, done.progress
        rows = session.scalars(select(FaceEmbedding).where(FaceEmbedding.model_id == base.id)).all()
        assert {row.face_id for row in rows} == {face.id for face in faces}
        assert session.get(FaceEmbedding, (faces[0].id, base.id)).vector == kept
        assert session.get(FaceEmbedding, (faces[1].id, older.id)) is not None, "other models left alone"
        new = [row for row in rows if row.vector != kept]
        vectors = np.stack([np.frombuffer(row.vector, dtype=np.float32) for row in new])
        assert session.get(FaceEmbedding, (broken.id, base.id)) is None
    assert vectors.shape == (9, 128)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert result["missing"] == 10  # nine faces and the broken one
    assert (result["embedded"], result["skipped"], result["still_missing"]) == (9, 1, 1)
    assert result["complete"] is False, "the broken face is still missing"
    assert (progress["phase"], progress["embedded"], progress["skipped"]) == ("done", 9, 1)
    generations = _generations(settings, base.id)
    assert generations.pop(0) == 1, "the row written before generations existed"
    assert list(generations) == list(range(1, len(generations) + 1)), "one increasing number per batch"
    assert all(count <= 4 for count in generations.values()) and sum(generations.values()) == 9
    assert result["generation"] == _counter(settings, base.id) == max(generations)

    loads = model_cache.loads()
    with session_scope(settings.database_url) as session:
        again = add_job(session, "embed", {"model": str(base.id)})
    assert run_in_process(settings, again.id).status == "succeeded"
    with session_scope(settings.database_url) as session:
        result = get_job(session, again.id).result
    assert (result["embedded"], result["skipped"], result["still_missing"]) == (0, 1, 1)
    assert _counter(settings, base.id) == max(generations), "nothing written, no generation taken"
    assert model_cache.loads() == loads, "the second job reused the loaded model"


def test_a_cancelled_pass_resumes_with_what_is_missing_and_the_serving_model_switches_at_completion(
    settings: Settings,
    store: BlobStore,
    johns_dir: Path,
    mobilefacenet_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings.reindex_batch_size = 4
    with session_scope(settings.database_url) as session:
        serving = add_ready_base(session, store, mobilefacenet_checkpoint)
        session.add(Activation(model_id=serving.id, actor="test", embedded_at=datetime(2026, 1, 1)))
        session.flush()
        base = add_ready_base(session, store, mobilefacenet_checkpoint)
        session.add(Activation(model_id=base.id, actor="test", reason="switch"))
        for data in _images(johns_dir, 10):
            add_face(session, store, data, settings)
        first = add_job(session, "reindex", {"model": str(base.id)})

    def cancel_after_the_first(batch: int) -> None:
        with session_scope(settings.database_url) as session:
            session.execute(update(Job).where(Job.id == first.id).values(cancel_requested=True))

    with monkeypatch.context() as patch:
        _after_each_write(patch, cancel_after_the_first)
        assert run_in_process(settings, first.id, EVERY_BATCH).status == "cancelled"
    assert _generations(settings, base.id) == {1: 4}
    with session_scope(settings.database_url) as session:
        assert serving_model(session).id == serving.id, "a half-embedded model does not serve"
        second = add_job(session, "reindex", {"model": str(base.id)})

    assert run_in_process(settings, second.id).status == "succeeded"
    assert _generations(settings, base.id) == {1: 4, 2: 4, 3: 2}
    with session_scope(settings.database_url) as session:
        result = get_job(session, second.id).result
        assert (result["missing"], result["embedded"], result["complete"]) == (6, 6, True)
        assert serving_model(session).id == base.id, "complete: the new model serves"


@pytest.mark.parametrize("kind", ["reindex", "embed"])
def test_faces_stored_during_the_pass_are_embedded_by_it_or_by_the_embed_job_their_upload_queues(
    settings: Settings,
    store: BlobStore,
    johns_dir: Path,
    mobilefacenet_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    settings.reindex_batch_size = 4
    images = _images(johns_dir, 9)
    with session_scope(settings.database_url) as session:
        base = add_ready_base(session, store, mobilefacenet_checkpoint)
        session.add(Activation(model_id=base.id, actor="test"))
        first = [add_face(session, store, data, settings) for data in images[:5]]
        job = add_job(session, kind, {"model": str(base.id)})
    late: list[uuid.UUID] = []

    def arrive(batch: int) -> None:
        if batch != 1:
            return
        with session_scope(settings.database_url) as session:
            faces = [add_face(session, store, data, settings) for data in images[5:]]
            # One committed late, behind the pass's cursor: a reindex looks again from the oldest face; an
            # embed job leaves it to the next one (queued by its upload), which scans the lag window again.
            faces[0].created_at = datetime(2000, 1, 1) if kind == "reindex" else first[0].created_at
            late.extend(face.id for face in faces)

    with monkeypatch.context() as patch:
        _after_each_write(patch, arrive)
        assert run_in_process(settings, job.id).status == "succeeded"
    with session_scope(settings.database_url) as session:
        result = get_job(session, job.id).result
        if kind == "embed":
            assert (result["missing"], result["embedded"], result["still_missing"]) == (None, 8, 0)
            assert result["complete"] is False, "the late face is missing: no switch yet"
            assert serving_model(session) is None
            following = add_job(session, "embed", {"model": str(base.id)})
    if kind == "embed":
        assert run_in_process(settings, following.id).status == "succeeded"
        with session_scope(settings.database_url) as session:
            result = get_job(session, following.id).result
        assert (result["embedded"], result["complete"]) == (1, True)
    else:
        assert (result["missing"], result["embedded"], result["still_missing"], result["complete"]) == (
            5,
            9,
            0,
            True,
        )
    with session_scope(settings.database_url) as session:
        embedded = set(
            session.scalars(select(FaceEmbedding.face_id).where(FaceEmbedding.model_id == base.id))
        )
        assert serving_model(session).id == base.id
    assert set(late) <= embedded and len(embedded) == 9


def test_a_face_deleted_during_a_batch_is_dropped_and_the_rest_written(
    settings: Settings,
    store: BlobStore,
    johns_dir: Path,
    mobilefacenet_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings.reindex_batch_size = 8
    with session_scope(settings.database_url) as session:
        base = add_ready_base(session, store, mobilefacenet_checkpoint)
        session.add(Activation(model_id=base.id, actor="test"))  # so the pass checks that nothing is missing
        faces = [add_face(session, store, data, settings) for data in _images(johns_dir, 5)]
        job = add_job(session, "embed", {"model": str(base.id)})
    embed_rows = embedding_pass._embed_rows

    def delete_one(*args: Any) -> list[dict[str, Any]]:
        rows = embed_rows(*args)
        with session_scope(settings.database_url) as session:
            session.execute(delete(Face).where(Face.id == faces[2].id))
        return rows

    monkeypatch.setattr(embedding_pass, "_embed_rows", delete_one)
    assert run_in_process(settings, job.id, TIMINGS).status == "succeeded"
    with session_scope(settings.database_url) as session:
        result = get_job(session, job.id).result
    assert (result["embedded"], result["still_missing"], result["complete"]) == (4, 0, True)
    assert _generations(settings, base.id) == {1: 4}, "the failed attempt took no generation"


def _watermark(settings: Settings, model_id: uuid.UUID) -> tuple[datetime, uuid.UUID] | None:
    with session_scope(settings.database_url) as session:
        row = session.get(EmbeddingGeneration, model_id)
        assert row is not None
        if row.covered_created_at is None:
            return None
        assert row.covered_id is not None
        return row.covered_created_at, row.covered_id


def _old_faces(
    session: Session, store: BlobStore, settings: Settings, images: list[bytes], age: timedelta
) -> list[Face]:
    """Faces stored `age` ago, a second apart, oldest first."""
    faces = [add_face(session, store, data, settings) for data in images]
    start = utcnow() - age
    for i, face in enumerate(faces):
        face.created_at = start + timedelta(seconds=i)
    return faces


class FaceQueries:
    """The SQL statements that read the faces table while it listens, and the rows each returned."""

    def __init__(self) -> None:
        self.statements: list[tuple[str, int]] = []

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if re.search(r"\bFROM faces\b", statement):
            self.statements.append((statement, cursor.rowcount))

    def __enter__(self) -> "FaceQueries":
        event.listen(Engine, "after_cursor_execute", self)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(Engine, "after_cursor_execute", self)


def test_an_embed_pass_reads_only_the_faces_after_the_watermark(
    settings: Settings, store: BlobStore, johns_dir: Path, mobilefacenet_checkpoint: Path
) -> None:
    old_count = 300
    with session_scope(settings.database_url) as session:
        base = add_ready_base(session, store, mobilefacenet_checkpoint)
        session.add(Activation(model_id=base.id, actor="test", embedded_at=utcnow()))  # serving already
        start = utcnow() - timedelta(days=1)
        old = [
            Face(
                id=uuid.uuid4(),
                sha256=uuid.uuid4().hex * 2,
                byte_size=1,
                media_type="image/png",
                width=112,
                height=112,
                channels=3,
                split="train",
                created_at=start + timedelta(seconds=i),
            )
            for i in range(old_count)
        ]
        session.add_all(old)
        session.flush()
        session.add_all(
            FaceEmbedding(face_id=face.id, model_id=base.id, vector=b"\0" * 512, quality=1.0, generation=1)
            for face in old
        )
        session.add(EmbeddingGeneration(model_id=base.id, generation=1))
        sweep = add_job(session, "reindex", {"model": str(base.id)})
    assert run_in_process(settings, sweep.id).status == "succeeded"
    watermark = _watermark(settings, base.id)
    assert watermark is not None and watermark[0] > old[-1].created_at, (
        "a reindex over nothing missing sets it"
    )

    with session_scope(settings.database_url) as session:
        new = [add_face(session, store, data, settings).id for data in _images(johns_dir, 2)]
        job = add_job(session, "embed", {"model": str(base.id)})
    with FaceQueries() as queries:
        assert run_in_process(settings, job.id).status == "succeeded"

    with session_scope(settings.database_url) as session:
        result = get_job(session, job.id).result
        embedded = session.scalars(select(FaceEmbedding.face_id).where(FaceEmbedding.face_id.in_(new))).all()
    assert (result["missing"], result["embedded"], result["still_missing"]) == (None, 2, 0)
    assert result["complete"] is None, "its activation is marked: nothing to count"
    assert set(embedded) == set(new)
    assert queries.statements, "the pass asked for the missing faces"
    unbounded = [sql for sql, _ in queries.statements if "(faces.created_at, faces.id) >" not in sql]
    assert unbounded == [], "every read of faces starts at the watermark: no count, no scan from the oldest"
    assert sum(rows for _, rows in queries.statements) == 2, "only the two new faces came back"


def test_the_watermark_stays_behind_the_lag_and_a_face_committed_late_inside_it_is_embedded_next(
    settings: Settings, store: BlobStore, johns_dir: Path, mobilefacenet_checkpoint: Path
) -> None:
    settings.reindex_batch_size = 4
    images = _images(johns_dir, 9)
    lag = timedelta(seconds=settings.embed_watermark_lag_s)
    with session_scope(settings.database_url) as session:
        base = add_ready_base(session, store, mobilefacenet_checkpoint)
        old = _old_faces(session, store, settings, images[:6], timedelta(hours=1))
        recent = add_face(session, store, images[6], settings)
        job = add_job(session, "embed", {"model": str(base.id)})
    assert run_in_process(settings, job.id).status == "succeeded"
    after_first = utcnow()
    watermark = _watermark(settings, base.id)
    assert watermark is not None
    assert watermark[0] >= old[-1].created_at, "it moved past the old faces"
    assert watermark[0] <= after_first - lag < recent.created_at, "never within the lag"

    # Stored just now but stamped before `recent`, already embedded: a face whose commit came late.
    with session_scope(settings.database_url) as session:
        late = add_face(session, store, images[7], settings)
        late.created_at = recent.created_at - timedelta(seconds=1)
        following = add_job(session, "embed", {"model": str(base.id)})
    assert run_in_process(settings, following.id).status == "succeeded"
    with session_scope(settings.database_url) as session:
        result = get_job(session, following.id).result
        assert session.get(FaceEmbedding, (late.id, base.id)) is not None
    assert result["embedded"] == 1
    moved = _watermark(settings, base.id)
    assert moved is not None and watermark <= moved and moved[0] <= utcnow() - lag


def test_a_reindex_finds_a_face_behind_the_watermark_that_an_embed_job_does_not_look_at(
    settings: Settings, store: BlobStore, johns_dir: Path, mobilefacenet_checkpoint: Path
) -> None:
    with session_scope(settings.database_url) as session:
        base = add_ready_base(session, store, mobilefacenet_checkpoint)
        session.add(Activation(model_id=base.id, actor="test"))
        old = _old_faces(session, store, settings, _images(johns_dir, 4), timedelta(hours=1))
        job = add_job(session, "embed", {"model": str(base.id)})
    assert run_in_process(settings, job.id).status == "succeeded"
    watermark = _watermark(settings, base.id)
    assert watermark is not None and watermark[0] > old[-1].created_at
    # As a face the pass skipped (its image could not be read) and whose image was put right afterwards.
    with session_scope(settings.database_url) as session:
        session.execute(delete(FaceEmbedding).where(FaceEmbedding.face_id == old[1].id))
        embed = add_job(session, "embed", {"model": str(base.id)})
        reindex = add_job(session, "reindex", {"model": str(base.id)})

    assert run_in_process(settings, embed.id).status == "succeeded"
    with session_scope(settings.database_url) as session:
        assert get_job(session, embed.id).result["embedded"] == 0, "behind the watermark: not scanned"
    assert run_in_process(settings, reindex.id).status == "succeeded"
    with session_scope(settings.database_url) as session:
        result = get_job(session, reindex.id).result
        assert session.get(FaceEmbedding, (old[1].id, base.id)) is not None
    assert (result["missing"], result["embedded"], result["still_missing"], result["complete"]) == (
        1,
        1,
        0,
        True,
    )


@pytest.mark.parametrize(("kind", "threads"), [("embed", 1), ("reindex", None)])
def test_an_embed_job_runs_with_its_own_torch_threads_and_restores_them(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, kind: str, threads: int | None
) -> None:
    import torch

    settings.embed_torch_threads = 1
    before = torch.get_num_threads()
    seen: list[int] = []
    monkeypatch.setattr(embedding_pass, "_run", lambda ctx: seen.append(torch.get_num_threads()) or {})
    with session_scope(settings.database_url) as session:
        job = add_job(session, kind, {"model": str(uuid.uuid4())})

    assert run_in_process(settings, job.id).status == "succeeded"
    assert seen == [threads or before], "a reindex (on the gpu queue) keeps torch's default"
    assert torch.get_num_threads() == before


def test_a_reindex_larger_than_a_chunk_runs_as_chunks_each_face_embedded_once(
    settings: Settings, store: BlobStore, johns_dir: Path, mobilefacenet_checkpoint: Path, broker: QueueProbe
) -> None:
    """No other worker listens here: the job's own worker takes every chunk, and sends one message each."""
    settings.reindex_batch_size, settings.reindex_chunk_size = 2, 4
    images = _images(johns_dir, 11)
    with session_scope(settings.database_url) as session:
        base = add_ready_base(session, store, mobilefacenet_checkpoint)
        faces = [add_face(session, store, data, settings) for data in images]
        session.add(FaceEmbedding(face_id=faces[0].id, model_id=base.id, vector=b"\1" * 512, quality=1.0))
        job = add_job(session, "reindex", {"model": str(base.id)})

    assert run_in_process(settings, job.id).status == "succeeded"
    with session_scope(settings.database_url) as session:
        done = get_job(session, job.id)
        chunks = session.scalars(
            select(JobChunk).where(JobChunk.job_id == job.id).order_by(JobChunk.seq)
        ).all()
        embedded = session.scalars(
            select(FaceEmbedding.face_id).where(FaceEmbedding.model_id == base.id)
        ).all()
        assert [(c.status, c.attempts, c.worker) for c in chunks] == [("succeeded", 1, "test-worker")] * 3
        assert [c.progress["embedded"] for c in chunks] == [4, 4, 2]
        assert sorted(broker.sent_job_ids()) == sorted(str(c.id) for c in chunks)
    assert sorted(embedded) == sorted(face.id for face in faces), "every face, once"
    assert (done.result["chunks"], done.result["missing"], done.result["embedded"]) == (3, 10, 10)
    assert done.result["complete"] is True and done.result["still_missing"] == 0
    assert (done.progress["chunks"], done.progress["chunks_done"]) == (3, 3)


def test_a_cancel_stops_every_chunk_and_a_chunk_out_of_attempts_fails_the_job(
    settings: Settings, store: BlobStore, johns_dir: Path, mobilefacenet_checkpoint: Path
) -> None:
    settings.reindex_batch_size, settings.reindex_chunk_size = 2, 3
    with session_scope(settings.database_url) as session:
        base = add_ready_base(session, store, mobilefacenet_checkpoint)
        for data in _images(johns_dir, 9):
            add_face(session, store, data, settings)
        cancelled = add_job(session, "reindex", {"model": str(base.id)})
        failing = add_job(session, "reindex", {"model": str(base.id)})

    calls = 0

    def cancel_during_the_second_chunk(ctx: ChunkContext) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 2:
            with session_scope(settings.database_url) as session:
                session.execute(update(Job).where(Job.id == cancelled.id).values(cancel_requested=True))
            ctx.raise_if_stopped()
        return {"embedded": 0, "batches": 0}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reindex_chunks, "embed_chunk", cancel_during_the_second_chunk)
        assert run_in_process(settings, cancelled.id, EVERY_BATCH).status == "cancelled"
    with session_scope(settings.database_url) as session:
        states = session.scalars(
            select(JobChunk.status).where(JobChunk.job_id == cancelled.id).order_by(JobChunk.seq)
        ).all()
    assert states == ["succeeded", "cancelled", "cancelled"]

    def broken(_ctx: ChunkContext) -> dict[str, Any]:
        raise RuntimeError("no GPU memory")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reindex_chunks, "embed_chunk", broken)
        outcome = run_in_process(settings, failing.id, EVERY_BATCH)
    assert outcome.status == "failed" and outcome.error is not None
    assert outcome.error["type"] == "chunk-failed"
    assert "chunk 0 failed after 3 attempts: RuntimeError: no GPU memory" in outcome.error["detail"]
    with session_scope(settings.database_url) as session:
        states = session.scalars(
            select(JobChunk.status).where(JobChunk.job_id == failing.id).order_by(JobChunk.seq)
        ).all()
    assert states == ["failed", "cancelled", "cancelled"]
