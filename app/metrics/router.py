"""/v1/metrics: one call with everything a dashboard shows, and feedback over a bounded window of time."""

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query

from app.auth.dependencies import requires
from app.auth.scopes import Scope
from app.deps import SessionDep
from app.metrics import service
from app.metrics.schemas import DashboardMetrics, FeedbackSeries
from app.metrics.series import MAX_BUCKETS, Bucket, WindowOutOfRange, default_buckets, feedback_series
from app.problems import Problem

router = APIRouter(prefix="/metrics", tags=["metrics"])


@router.get("", dependencies=[requires(Scope.METRICS_READ)], response_model=DashboardMetrics)
def get_metrics(session: SessionDep) -> DashboardMetrics:
    """Feedback and face counts, jobs by status, the active model and the latest fine-tune against its parent.

    Prometheus figures are at `GET /metrics` (outside /v1).
    """
    return service.dashboard(session=session)


@router.get("/feedback-series", dependencies=[requires(Scope.METRICS_READ)], response_model=FeedbackSeries)
def get_feedback_series(
    session: SessionDep,
    bucket: Annotated[Bucket, Query()] = Bucket.DAY,
    buckets: Annotated[
        int | None, Query(ge=1, le=MAX_BUCKETS, description="how many; 30 days or 48 hours by default")
    ] = None,
    end: Annotated[
        datetime | None, Query(description="an instant in the last bucket (UTC when naive); now by default")
    ] = None,
) -> FeedbackSeries:
    """Feedback pairs created per hour or day, by split and label, over at most 366 buckets.

    The `cross` split holds the wasted labels (pairs across splits, used by no job).
    """
    count = buckets if buckets is not None else default_buckets(bucket)
    try:
        return feedback_series(session=session, bucket=bucket, buckets=count, end=end)
    except WindowOutOfRange as exc:
        error = {"loc": ["query", "end"], "msg": str(exc), "type": "value_error"}
        raise Problem(422, "validation-error", "Invalid request", str(exc), errors=[error]) from exc
