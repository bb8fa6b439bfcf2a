"""The serving model (blue/green) and coalesced embedding jobs, on the real PostgreSQL and on SQLite."""

import re
import threading
import uuid

from sqlalchemy import Engine, event, func, select

from app.config import Settings
from app.db import session_scope
from app.domain import JobKind, JobStatus
from app.models.serving import (
    embed_job_key,
    mark_embedded_if_complete,
    missing_faces,
    models_in_service,
    request_embedding,
    serving_model,
)
from app.tables import Activation, FaceEmbedding, Job
from tests.app.factories import activate_directly, insert_face, insert_model
from tests.queues import QueueProbe


def _embed(settings: Settings, model_id: uuid.UUID, face_ids: list[uuid.UUID]) -> None:
    with session_scope(settings.database_url) as session:
        for face_id in face_ids:
            session.add(FaceEmbedding(face_id=face_id, model_id=model_id, vector=b"\0" * 16, quality=1.0))


def _serving(settings: Settings) -> uuid.UUID | None:
    with session_scope(settings.database_url) as session:
        model = serving_model(session)
        return model.id if model is not None else None


def _mark(settings: Settings, model_id: uuid.UUID) -> bool | None:
    with session_scope(settings.database_url) as session:
        return mark_embedded_if_complete(session, model_id)


def test_the_previous_model_serves_until_the_new_one_covers_every_face(any_settings: Settings) -> None:
    settings = any_settings
    faces = [insert_face(settings) for _ in range(3)]
    old, new = insert_model(settings), insert_model(settings)
    activate_directly(settings, old)
    assert _serving(settings) is None  # activated, but nothing embedded yet

    _embed(settings, old, faces)
    assert _mark(settings, old) is True
    assert _serving(settings) == old

    activate_directly(settings, new)
    _embed(settings, new, faces[:2])
    assert _mark(settings, new) is False
    assert _serving(settings) == old
    with session_scope(settings.database_url) as session:
        assert missing_faces(session, new) == 1
        assert models_in_service(session) == [new, old]

    _embed(settings, new, faces[2:])
    assert _mark(settings, new) is True
    assert _serving(settings) == new
    with session_scope(settings.database_url) as session:
        assert models_in_service(session) == [new]
        marked = session.scalar(
            select(func.count()).select_from(Activation).where(Activation.embedded_at.is_not(None))
        )
    assert marked == 2


def _reads_of_faces(settings: Settings, model_id: uuid.UUID) -> tuple[bool | None, list[str]]:
    """mark_embedded_if_complete's answer and the statements it ran that read the faces table."""
    statements: list[str] = []

    def seen(conn: object, cursor: object, statement: str, *args: object) -> None:
        if re.search(r"\bFROM faces\b", statement):
            statements.append(statement)

    event.listen(Engine, "before_cursor_execute", seen)
    try:
        with session_scope(settings.database_url) as session:
            answer = mark_embedded_if_complete(session, model_id)
    finally:
        event.remove(Engine, "before_cursor_execute", seen)
    return answer, statements


def test_marking_looks_at_the_faces_only_while_an_activation_of_the_model_is_unmarked(
    any_settings: Settings,
) -> None:
    settings = any_settings
    faces = [insert_face(settings) for _ in range(2)]
    model, never_activated = insert_model(settings), insert_model(settings)
    _embed(settings, model, faces[:1])

    assert _reads_of_faces(settings, never_activated) == (None, []), "nothing to mark, nothing counted"
    activate_directly(settings, model)
    answer, statements = _reads_of_faces(settings, model)
    assert answer is False and statements, "an unmarked activation: the faces are checked"
    _embed(settings, model, faces[1:])
    answer, statements = _reads_of_faces(settings, model)
    assert answer is True and statements
    assert _serving(settings) == model

    insert_face(settings)  # not embedded yet: the marked model keeps serving, and no call counts again
    assert _reads_of_faces(settings, model) == (None, [])
    assert _serving(settings) == model


def test_arrivals_coalesce_into_one_queued_embedding_job_per_model(
    any_settings: Settings, broker: QueueProbe
) -> None:
    settings = any_settings
    old, new = insert_model(settings), insert_model(settings)
    face = insert_face(settings)
    activate_directly(settings, old)
    _embed(settings, old, [face])
    _mark(settings, old)
    activate_directly(settings, new)

    with session_scope(settings.database_url) as session:
        first = request_embedding(session, settings)
    with session_scope(settings.database_url) as session:
        second = request_embedding(session, settings)

    assert len(first) == 2 and second == []
    with session_scope(settings.database_url) as session:
        jobs = session.scalars(select(Job).order_by(Job.coalesce_key)).all()
        assert {job.coalesce_key for job in jobs} == {embed_job_key(old), embed_job_key(new)}
        assert {job.params["model"] for job in jobs} == {str(old), str(new)}
        assert all(job.kind == JobKind.EMBED and job.status == JobStatus.QUEUED for job in jobs)
        # Once a job runs, arrivals need a successor: it may have read the faces before they came.
        jobs[0].status = JobStatus.RUNNING
    with session_scope(settings.database_url) as session:
        third = request_embedding(session, settings)
    assert len(third) == 1
    assert sorted(broker.sent_job_ids(broker.embed_name)) == sorted(str(job_id) for job_id in first + third)
    assert broker.sent_job_ids() == [], "embed jobs go to the embed queue, not the gpu queue"


def test_concurrent_arrivals_add_one_job(settings: Settings) -> None:
    model = insert_model(settings)
    activate_directly(settings, model)
    added: list[uuid.UUID] = []
    barrier = threading.Barrier(8)

    def arrive() -> None:
        barrier.wait()
        with session_scope(settings.database_url) as session:
            added.extend(request_embedding(session, settings))

    threads = [threading.Thread(target=arrive) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(added) == 1
    with session_scope(settings.database_url) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 1


def test_no_model_in_service_queues_nothing(any_settings: Settings) -> None:
    insert_face(any_settings)
    with session_scope(any_settings.database_url) as session:
        assert request_embedding(session, any_settings) == []
