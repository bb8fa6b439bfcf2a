"""`/v1/review`: pairs worth a reviewer's time, each leased to one reviewer; answer with POST /v1/feedback."""

import uuid

from fastapi import APIRouter, Response

from app.auth.dependencies import CallerDep, caller_id, requires
from app.auth.scopes import Scope
from app.deps import SessionDep, SettingsDep
from app.problems import problem_doc
from app.review import service
from app.review.schemas import LeaseRequest, ReviewPage

router = APIRouter(prefix="/review", tags=["review"])


@router.post(
    "/leases",
    dependencies=[requires(Scope.REVIEW)],
    response_model=ReviewPage,
    responses={
        409: problem_doc("No model serves yet (no-serving-model)"),
        422: problem_doc("limit outside 1..MAGTUNE_REVIEW_MAX_LIMIT (invalid-limit), or an unknown field"),
    },
)
def lease_pairs(
    session: SessionDep, settings: SettingsDep, caller: CallerDep, body: LeaseRequest | None = None
) -> ReviewPage:
    """Up to `limit` pairs to judge, each leased to the caller until `expires_at`: answer one with
    POST /v1/feedback and its `lease_id`, or skip it with DELETE /v1/review/leases/{lease_id}. Fewer pairs
    come back when fewer are eligible."""
    limit = (body or LeaseRequest()).limit
    if limit is None:
        limit = min(service.DEFAULT_LIMIT, settings.review_max_limit)
    return service.lease_pairs(session=session, settings=settings, limit=limit, holder=caller_id(caller))


@router.delete(
    "/leases/{lease_id}",
    dependencies=[requires(Scope.REVIEW)],
    status_code=204,
    responses={
        404: problem_doc("No such lease"),
        409: problem_doc("The lease was given to another API key (lease-not-yours)"),
    },
)
def skip_pair(lease_id: uuid.UUID, session: SessionDep, caller: CallerDep) -> Response:
    """Skip a leased pair: the lease is released and the pair may be offered again."""
    service.release_lease(session=session, lease_id=lease_id, holder=caller_id(caller))
    return Response(status_code=204)
