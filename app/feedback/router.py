"""`/v1/feedback`: record, batch-record, read, list and retract same/different judgements."""

import uuid
from contextlib import closing
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from app.auth.dependencies import CallerDep, caller_id, request_caller, requires
from app.auth.scopes import Scope
from app.config import Settings
from app.db import get_session_factory
from app.deps import PageDep, SessionDep, SettingsDep, app_settings
from app.feedback import service
from app.feedback.schemas import REVIEW_SOURCE, FeedbackBatchIn, FeedbackBatchOut, FeedbackIn, FeedbackOut
from app.idempotency import REPLAYED_HEADER, Answer, IdempotencyKey, run_idempotently
from app.observability import record_feedback_ingested
from app.pagination import PAGE_RESPONSES, Page
from app.problems import problem_doc
from app.review.service import claim_lease
from app.schemas import stored_text

router = APIRouter(prefix="/feedback", tags=["feedback"])


def _respond(answer: Answer, location: str | None = None) -> JSONResponse:
    headers = {REPLAYED_HEADER: "true"} if answer.replayed else {}
    if location is not None:
        headers["Location"] = location
    return JSONResponse(answer.body, status_code=answer.status_code, headers=headers)


def _endpoint(name: str, caller_key: str | None) -> str:
    """Idempotency keys are per API key: another key's request with the same header is not a replay."""
    return f"{caller_key} {name}" if caller_key else name


@router.post(
    "",
    dependencies=[requires(Scope.FEEDBACK_WRITE)],
    status_code=201,
    response_model=FeedbackOut,
    responses={
        200: {"model": FeedbackOut, "description": "The pair was recorded before with the same label"},
        409: problem_doc(
            "The pair has another label (conflicting-label), the Idempotency-Key was reused, or `lease_id` "
            "names no live lease (unknown-lease, lease-expired), one holding another pair "
            "(lease-mismatch) or one given to another API key (lease-not-yours)"
        ),
        422: problem_doc("Invalid body, unknown face, or a face paired with itself (same-face)"),
    },
)
async def create_feedback(
    item: FeedbackIn, request: Request, idempotency_key: IdempotencyKey = None
) -> Response:
    """Record one judgement on a pair of faces; (a, b) and (b, a) are the same pair.

    The pair records the API key that posted it; `annotator` labels the person within that key.
    """
    # The busiest route takes the request rather than the session, settings and caller dependencies: each
    # dependency FastAPI solves costs every request, and these three cost this one about a third of its
    # CPU. A pair of two labelled faces is stored on the event loop in one statement (app/feedback/
    # settled.py); anything else takes the general path in the thread pool.
    key_id = caller_id(request_caller(request))
    settled = None
    if idempotency_key is None:
        settled = await request.app.state.settled_pairs.record(item, key_id)
    if settled is not None:
        answer = Answer(201, FeedbackOut.model_validate(settled).model_dump(mode="json"))
    else:
        settings = app_settings(request)
        answer = await run_in_threadpool(_record_feedback, item, settings, key_id, idempotency_key)
    if answer.status_code == 201 and not answer.replayed:
        record_feedback_ingested(item.label)
    return _respond(answer, location=f"/v1/feedback/{answer.body['id']}")


def _record_feedback(
    item: FeedbackIn, settings: Settings, key_id: str | None, idempotency_key: str | None
) -> Answer:
    """The general path of a single post: the lease, placement, an existing pair, the Idempotency-Key."""
    with closing(get_session_factory(settings.database_url)()) as session:

        def act() -> tuple[int, dict]:
            recorded = item
            if item.lease_id is not None:
                claim_lease(
                    session=session,
                    lease_id=item.lease_id,
                    face_x=item.face_a,
                    face_y=item.face_b,
                    holder=key_id,
                )
                recorded = item.model_copy(update={"source": REVIEW_SOURCE})
            stored, created = service.record_feedback(
                session=session, item=recorded, fractions=settings.split_fractions, api_key_id=key_id
            )
            return (201 if created else 200), FeedbackOut.model_validate(stored).model_dump(mode="json")

        return run_idempotently(
            session,
            key=idempotency_key,
            endpoint=_endpoint("POST /v1/feedback", key_id),
            payload=item.model_dump(mode="json"),
            act=act,
        )


@router.post(
    "/batch",
    dependencies=[requires(Scope.FEEDBACK_WRITE)],
    response_model=FeedbackBatchOut,
    responses={413: problem_doc("More items than `max_feedback_batch`; nothing was stored")},
)
def create_feedback_batch(
    batch: FeedbackBatchIn,
    session: SessionDep,
    settings: SettingsDep,
    caller: CallerDep,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Record many pairs at once: good items are stored, each bad one is reported with its index."""
    key_id = caller_id(caller)

    created_by_label: dict[int, int] = {}

    def act() -> tuple[int, dict]:
        outcome = service.record_feedback_batch(
            session=session,
            items=batch.items,
            max_items=settings.max_feedback_batch,
            fractions=settings.split_fractions,
            api_key_id=key_id,
        )
        created_by_label.update(outcome.created_by_label)
        return 200, outcome.body

    answer = run_idempotently(
        session,
        key=idempotency_key,
        endpoint=_endpoint("POST /v1/feedback/batch", key_id),
        payload=batch.items,
        act=act,
    )
    if not answer.replayed:
        for label, count in created_by_label.items():
            record_feedback_ingested(label, count)
    return _respond(answer)


@router.get(
    "",
    dependencies=[requires(Scope.FEEDBACK_READ)],
    response_model=Page[FeedbackOut],
    responses=PAGE_RESPONSES,
)
def list_feedback(
    session: SessionDep,
    page: PageDep,
    label: Annotated[int | None, Query(ge=0, le=1)] = None,
    split: Annotated[Annotated[str, stored_text(16)] | None, Query()] = None,
    face: Annotated[uuid.UUID | None, Query(description="Pairs naming this face on either side")] = None,
    api_key: Annotated[
        Annotated[str, stored_text(32)] | None, Query(description="Pairs posted with this API key id")
    ] = None,
) -> Page[FeedbackOut]:
    """Feedback pairs, newest first."""
    pairs, cursor = service.list_feedback(
        session=session, page=page, label=label, split=split, face=face, api_key=api_key
    )
    return Page[FeedbackOut](items=[FeedbackOut.model_validate(pair) for pair in pairs], next_cursor=cursor)


# `:uuid`, so that `/v1/feedback/batch` is never taken for an id: GET or DELETE on it is a 405 naming POST,
# as the document has it, and an id that is not a UUID names no feedback (404).
@router.get(
    "/{feedback_id:uuid}",
    dependencies=[requires(Scope.FEEDBACK_READ)],
    response_model=FeedbackOut,
    responses={404: problem_doc("No such feedback")},
)
def get_feedback(feedback_id: uuid.UUID, session: SessionDep) -> FeedbackOut:
    return FeedbackOut.model_validate(service.get_feedback(session=session, feedback_id=feedback_id))


@router.delete(
    "/{feedback_id:uuid}",
    dependencies=[requires(Scope.FEEDBACK_WRITE)],
    status_code=204,
    responses={404: problem_doc("No such feedback")},
)
def delete_feedback(feedback_id: uuid.UUID, session: SessionDep) -> Response:
    """Retract a judgement, e.g. to record the pair again with another label."""
    service.delete_feedback(session=session, feedback_id=feedback_id)
    return Response(status_code=204)
