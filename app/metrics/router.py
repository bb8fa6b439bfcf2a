"""/v1/metrics: one call with everything a dashboard shows."""

from fastapi import APIRouter

from app.auth.dependencies import requires
from app.auth.scopes import Scope
from app.deps import SessionDep
from app.metrics import service
from app.metrics.schemas import DashboardMetrics

router = APIRouter(prefix="/metrics", tags=["metrics"])


@router.get("", dependencies=[requires(Scope.METRICS_READ)], response_model=DashboardMetrics)
def get_metrics(session: SessionDep) -> DashboardMetrics:
    """Feedback and face counts, jobs by status, the active model and the latest fine-tune against its parent.

    Prometheus figures are at `GET /metrics` (outside /v1).
    """
    return service.dashboard(session=session)
