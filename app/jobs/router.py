"""/v1/jobs: start fine-tunes, evaluations and reindexes, follow them, cancel them."""

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool

from app.auth.dependencies import CallerDep, caller_id, requires
from app.auth.limits import check_job_cap
from app.auth.scopes import Scope
from app.deps import PageDep, SessionDep, SettingsDep
from app.domain import JobKind, JobStatus
from app.jobs import service
from app.jobs.events import EventStreamResponse, job_events, parse_last_event_id, read_snapshot
from app.jobs.schemas import JobCreate, JobOut
from app.pagination import PAGE_RESPONSES, Page
from app.problems import not_found, problem_doc

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.post(
    "",
    dependencies=[requires(Scope.JOBS_WRITE)],
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobOut,
    responses={
        404: problem_doc("A model named in the params does not exist (unknown-model)"),
        409: problem_doc("No model is active (no-active-model), or the model is not ready (model-not-ready)"),
        422: problem_doc("Unknown kind, unknown param or a param of the wrong type"),
    },
)
def create_job(
    body: JobCreate, session: SessionDep, settings: SettingsDep, caller: CallerDep, response: Response
) -> JobOut:
    """Queue a job; the params stored on it name the concrete models it will use.

    A key may have `max_active_jobs_per_key` jobs queued or running at once (429 `too-many-jobs` above).
    """
    check_job_cap(session, settings, caller)
    job = service.create_job(
        session=session, settings=settings, kind=body.kind, params=body.params, created_by=caller_id(caller)
    )
    session.commit()
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobOut.model_validate(service.get_job(session=session, job_id=job.id))


@router.get(
    "", dependencies=[requires(Scope.JOBS_READ)], response_model=Page[JobOut], responses=PAGE_RESPONSES
)
def list_jobs(
    session: SessionDep,
    page: PageDep,
    kind: Annotated[JobKind | None, Query()] = None,
    job_status: Annotated[JobStatus | None, Query(alias="status")] = None,
) -> Page[JobOut]:
    jobs, cursor = service.list_jobs(session=session, page=page, kind=kind, status=job_status)
    return Page[JobOut](items=[JobOut.model_validate(job) for job in jobs], next_cursor=cursor)


@router.get(
    "/{job_id}",
    dependencies=[requires(Scope.JOBS_READ)],
    response_model=JobOut,
    responses={404: problem_doc("No such job")},
)
def get_job(job_id: uuid.UUID, session: SessionDep) -> JobOut:
    return JobOut.model_validate(service.get_job(session=session, job_id=job_id))


@router.post(
    "/{job_id}/cancel",
    dependencies=[requires(Scope.JOBS_WRITE)],
    response_model=JobOut,
    responses={
        202: {"model": JobOut, "description": "Running: flagged, the worker stops at its next step"},
        404: problem_doc("No such job"),
        409: problem_doc("The job has finished already (job-finished)"),
    },
)
def cancel_job(job_id: uuid.UUID, session: SessionDep, caller: CallerDep, response: Response) -> JobOut:
    """A queued job is cancelled at once (200); a running one is flagged and stops at its next step (202)."""
    job, cancelled_now = service.cancel_job(session=session, job_id=job_id, cancelled_by=caller_id(caller))
    if not cancelled_now:
        response.status_code = status.HTTP_202_ACCEPTED
    return JobOut.model_validate(job)


@router.get(
    "/{job_id}/events",
    dependencies=[requires(Scope.JOBS_READ)],
    response_class=EventStreamResponse,
    status_code=status.HTTP_200_OK,
    responses={
        200: {
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": "`progress` events (id: the row's revision; data: the job's status, attempts, "
            "progress, result, error as JSON), then one `end` event once it has finished",
        },
        404: problem_doc("No such job"),
        422: problem_doc("Last-Event-ID is not an id this stream sends (invalid-last-event-id)"),
        503: problem_doc("This api process has as many streams open as it allows (too-many-streams)"),
    },
)
async def job_events_stream(
    job_id: uuid.UUID,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    last_event_id: Annotated[str | None, Header(max_length=32)] = None,
) -> EventStreamResponse:
    """The job's progress as server-sent events, until it finishes; resumes after `Last-Event-ID`.

    An event is sent whenever what it shows changes (read every `job_events_poll_s`, no connection held
    between reads), a `: heartbeat` comment every `job_events_heartbeat_s` otherwise. The stream closes after
    the `end` event, or after `job_events_max_lifetime_s` (resume with the last id).
    """
    session.close()  # the key check's session: a stream holds no connection between its polls
    last_seen = parse_last_event_id(last_event_id)
    first = await run_in_threadpool(read_snapshot, settings, job_id)
    if first is None:
        raise not_found("job", job_id)
    slot = request.app.state.event_streams.take()
    return EventStreamResponse(job_events(settings, job_id, first, last_seen), slot)
