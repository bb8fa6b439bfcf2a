"""Adding a job row and sending it to the broker once it is committed.

The low level under `app.jobs.service` (which validates params and resolves models first) and
`app.models.service` (which queues validations and reindexes with params it has already resolved): both
import this module and neither imports the other's, so the two services form no import cycle.
"""

import uuid

from sqlalchemy import event
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import dialect_insert
from app.domain import JobKind, JobStatus
from app.jobs.params import JobParams, params_json
from app.queue import try_enqueue_job
from app.tables import Job, utcnow

_PENDING_SENDS = "magtune.pending_job_sends"


def _send_pending(session: Session) -> None:
    for settings, job_id, kind in session.info.pop(_PENDING_SENDS, []):
        try_enqueue_job(settings, job_id, kind)


def _drop_pending(session: Session) -> None:
    session.info.pop(_PENDING_SENDS, None)


def send_after_commit(session: Session, settings: Settings, job: Job) -> None:
    """Send the job to the broker once the session's transaction commits (never if it rolls back).

    A worker must never receive the id of a row it cannot see yet; a failed send leaves the row queued
    without `enqueued_at`, and the sweeper re-sends it.
    """
    session.info.setdefault(_PENDING_SENDS, []).append((settings, job.id, job.kind))
    _listen(session)


def _listen(session: Session) -> None:
    if not event.contains(session, "after_commit", _send_pending):
        event.listen(session, "after_commit", _send_pending)
        event.listen(session, "after_rollback", _drop_pending)


def add_job(
    *,
    session: Session,
    settings: Settings,
    kind: JobKind,
    params: JobParams,
    parent_job_id: uuid.UUID | None = None,
    created_by: str | None = None,
) -> Job:
    """Add a queued job whose params are already validated and name concrete models; flushed, not committed.

    It is sent to the broker after the caller's commit. `created_by`: the API key behind it, if any.
    """
    job = Job(
        kind=kind,
        status=JobStatus.QUEUED,
        params=params_json(params),
        max_attempts=settings.job_max_attempts,
        parent_job_id=parent_job_id,
        created_by=created_by,
        attempts=0,
        cancel_requested=False,
    )
    session.add(job)
    session.flush()
    send_after_commit(session, settings, job)
    return job


def add_coalesced_job(
    *, session: Session, settings: Settings, kind: JobKind, params: JobParams, key: str
) -> uuid.UUID | None:
    """Add a queued job unless one with the same `key` is queued already; its id, or None when coalesced.

    The database decides (a unique index over the keys of queued jobs), so concurrent callers on any number
    of api processes add one job between them. A job that is already running does not count: work arriving
    while it runs may come after its query, so it gets a queued successor. Flushed, not committed; sent to
    the broker after the caller's commit.
    """
    job_id = uuid.uuid4()
    statement = (
        dialect_insert(session, Job)
        .values(
            id=job_id,
            kind=kind,
            status=JobStatus.QUEUED,
            params=params_json(params),
            max_attempts=settings.job_max_attempts,
            attempts=0,
            cancel_requested=False,
            coalesce_key=key,
            created_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=[Job.coalesce_key], index_where=Job.status == JobStatus.QUEUED)
        .returning(Job.id)
    )
    added = session.execute(statement).scalar_one_or_none()
    if added is None:
        return None
    session.info.setdefault(_PENDING_SENDS, []).append((settings, added, kind))
    _listen(session)
    return added
