"""Creating, reading and cancelling jobs. A job row is committed before its id goes to the broker."""

import uuid
from typing import Any

from pydantic import ValidationError
from sqlalchemy import update
from sqlalchemy.orm import Session

from app.config import Settings
from app.domain import JobKind, JobStatus, parse
from app.jobs.params import PARAMS_BY_KIND, JobParams, ValidateModelParams
from app.jobs.submission import add_job
from app.models import service as models_service
from app.pagination import PageParams, fetch_page
from app.problems import Problem, not_found
from app.tables import Job, utcnow


def validate_params(kind: str, params: JobParams | dict[str, Any]) -> JobParams:
    known = parse(JobKind, kind)
    model = PARAMS_BY_KIND.get(known) if known is not None else None
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


def _resolve_models(session: Session, params: JobParams) -> JobParams:
    """Name concrete models in the stored params, so a later activation cannot change what a job does."""
    resolved: dict[str, uuid.UUID] = {}
    for field, model_id in params.model_refs().items():
        if model_id is None:
            model_id = models_service.active_model_id(session)
            if model_id is None:
                raise Problem(
                    409, "no-active-model", "No active model", f"{field}: no model is active; name one"
                )
        resolved[field] = models_service.require_ready_model(session, model_id).id
    if isinstance(params, ValidateModelParams):
        models_service.get_model_row(session, params.model)
    return params.model_copy(update=resolved)


def create_job(
    *,
    session: Session,
    settings: Settings,
    kind: str,
    params: JobParams | dict[str, Any],
    parent_job_id: uuid.UUID | None = None,
    created_by: str | None = None,
) -> Job:
    """Add a queued job with validated, fully resolved params; it is sent to the broker after commit.

    Raises Problem: 422 invalid params, 404 unknown model, 409 no active model or model not ready.
    """
    validated = validate_params(kind, params)
    return add_job(
        session=session,
        settings=settings,
        kind=JobKind(kind),
        params=_resolve_models(session, validated),
        parent_job_id=parent_job_id,
        created_by=created_by,
    )


def get_job(*, session: Session, job_id: uuid.UUID) -> Job:
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise not_found("job", job_id)
    return job


def list_jobs(
    *, session: Session, page: PageParams, kind: str | None = None, status: str | None = None
) -> tuple[list[Job], str | None]:
    return fetch_page(session, Job, page, kind=kind, status=status)


def cancel_job(*, session: Session, job_id: uuid.UUID, cancelled_by: str | None = None) -> tuple[Job, bool]:
    """Cancel a job; returns the job and whether it is already cancelled (False: the worker will stop it).

    Both updates are conditional, so a job that the worker claims meanwhile is flagged instead.
    """
    cancelled = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
        .values(
            status=JobStatus.CANCELLED, cancel_requested=True, finished_at=utcnow(), cancelled_by=cancelled_by
        )
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).first()
    flagged = None
    if cancelled is None:
        flagged = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.RUNNING)
            .values(cancel_requested=True, cancelled_by=cancelled_by)
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        ).first()
    session.commit()
    job = get_job(session=session, job_id=job_id)
    if cancelled is None and flagged is None and job.status.finished:
        raise Problem(
            409,
            "job-finished",
            "Job already finished",
            f"job {job_id} is {job.status}",
            job_status=job.status,
        )
    return job, cancelled is not None
