"""The reindex job in-process against real PostgreSQL, the MobileFaceNet checkpoint and the johns faces."""

from pathlib import Path

import numpy as np
from sqlalchemy import select

from app.blobs import BlobStore
from app.config import Settings
from app.db import session_scope
from app.tables import FaceEmbedding
from tests.worker.factories import add_face, add_job, add_ready_base, get_job, run_in_process
from tests.worker.johns import johns_images


def test_reindex_embeds_every_face_and_leaves_other_models_alone(
    settings: Settings, store: BlobStore, johns_dir: Path, mobilefacenet_checkpoint: Path
) -> None:
    settings.reindex_batch_size = 4
    paths = johns_images(johns_dir, ["John_Simm", "John_Salley"], per_person=5)
    with session_scope(settings.database_url) as session:
        base = add_ready_base(session, store, mobilefacenet_checkpoint)
        older = add_ready_base(session, store, mobilefacenet_checkpoint)
        faces = [
            add_face(session, store, p.read_bytes(), settings) for group in paths.values() for p in group
        ]
        broken = add_face(session, store, paths["John_Simm"][0].read_bytes()[:300], settings)
        session.add(FaceEmbedding(face_id=faces[0].id, model_id=older.id, vector=b"\0" * 512, quality=1.0))
        job = add_job(session, "reindex", {"model": str(base.id)})

    assert run_in_process(settings, job.id).status == "succeeded"
    with session_scope(settings.database_url) as session:
        job = get_job(session, job.id)
        assert job.result["faces"] == len(faces) + 1
        assert (job.result["embedded"], job.result["skipped"]) == (len(faces), 1)
        assert job.progress["step"] == job.progress["steps"] == 3
        rows = session.scalars(select(FaceEmbedding).where(FaceEmbedding.model_id == base.id)).all()
        assert {row.face_id for row in rows} == {face.id for face in faces}
        assert broken.id not in {row.face_id for row in rows}
        vectors = np.stack([np.frombuffer(row.vector, dtype=np.float32) for row in rows])
        assert vectors.shape == (len(faces), 128)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        assert all(row.quality > 0 for row in rows)
        assert session.get(FaceEmbedding, (faces[0].id, older.id)) is not None
