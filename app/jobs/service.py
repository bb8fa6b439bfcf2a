"""Creating, reading and cancelling jobs. A job row is committed before its id goes to the broker."""

import uuid
from typing import Any

from pydantic import ValidationError
from sqlalchemy import event, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.jobs.params import FINISHED_STATUSES, PARAMS_BY_KIND, JobParams, params_json
from app.models import service as models_service
from app.pagination import PageParams, fetch_page
from app.problems import Problem, not_found
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
    if not event.contains(session, "after_commit", _send_pending):
        event.listen(session, "after_commit", _send_pending)
        event.listen(session, "after_rollback", _drop_pending)


def validate_params(kind: str, params: JobParams | dict[str, Any]) -> JobParams:
    model = PARAMS_BY_KIND.get(kind)
    if model is None:
        raise Problem(422, "unknown-job-kind", "Unknown job kind", f"no job kind {kind!r}")
    if isinstance(params, model):
        return params
    raw = params.model_dump() if isinstance(params, JobParams) else params
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        errors = [
            {"loc": ["params", *error["loc"]], "msg": error["msg"], "type": error["type"]}
            for error in exc.errors()
        ]
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors[:5])
        raise Problem(422, "invalid-job-params", "Invalid job parameters", detail, errors=errors) from exc


def _resolve_models(session: Session, kind: str, params: JobParams) -> dict[str, Any]:
    """Name concrete models in the stored params, so a later activation cannot change what a job does."""
    resolved = params_json(params)
    for field, model_id in params.model_refs().items():
        if model_id is None:
            model_id = models_service.active_model_id(session)
            if model_id is None:
                raise Problem(
                    409, "no-active-model", "No active model", f"{field}: no model is active; name one"
                )
        models_service.require_ready_model(session, model_id)
        resolved[field] = str(model_id)
    if kind == "validate_model":
        models_service.get_model_row(session, resolved["model"])
    return resolved


def create_job(
    *,
    session: Session,
    settings: Settings,
    kind: str,
    params: JobParams | dict[str, Any],
    parent_job_id: uuid.UUID | None = None,
) -> Job:
    """Add a queued job with validated, fully resolved params; it is sent to the broker after commit.

    Raises Problem: 422 invalid params, 404 unknown model, 409 no active model or model not ready.
    """
    validated = validate_params(kind, params)
    job = Job(
        kind=kind,
        status="queued",
        params=_resolve_models(session, kind, validated),
        max_attempts=settings.job_max_attempts,
        parent_job_id=parent_job_id,
        attempts=0,
        cancel_requested=False,
    )
    session.add(job)
    session.flush()
    send_after_commit(session, settings, job)
    return job


def get_job(*, session: Session, job_id: uuid.UUID) -> Job:
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise not_found("job", job_id)
    return job


def list_jobs(
    *, session: Session, page: PageParams, kind: str | None = None, status: str | None = None
) -> tuple[list[Job], str | None]:
    return fetch_page(session, Job, page, kind=kind, status=status)


def cancel_job(*, session: Session, job_id: uuid.UUID) -> tuple[Job, bool]:
    """Cancel a job; returns the job and whether it is already cancelled (False: the worker will stop it).

    Both updates are conditional, so a job that the worker claims meanwhile is flagged instead.
    """
    cancelled = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(status="cancelled", cancel_requested=True, finished_at=utcnow())
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).first()
    flagged = None
    if cancelled is None:
        flagged = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "running")
            .values(cancel_requested=True)
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        ).first()
    session.commit()
    job = get_job(session=session, job_id=job_id)
    if cancelled is None and flagged is None and job.status in FINISHED_STATUSES:
        raise Problem(
            409,
            "job-finished",
            "Job already finished",
            f"job {job_id} is {job.status}",
            job_status=job.status,
        )
    return job, cancelled is not None
