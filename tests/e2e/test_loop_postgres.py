"""The whole loop over HTTP against `magtune serve` and `magtune worker` on PostgreSQL and Redis."""

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.e2e.flow import run_feedback_loop, seed_over_http
from tests.e2e.services import RunningApi, ServiceProcess

pytestmark = pytest.mark.slow


def test_feedback_loop_on_postgres_and_redis(
    api: RunningApi,
    frontend_http: httpx.Client,
    operator_http: httpx.Client,
    start_worker: Callable[[], ServiceProcess],
    johns_dir: Path,
    mobilefacenet_checkpoint: Path,
) -> None:
    """The frontend's key uploads faces and posts feedback; the operator's key runs models and jobs."""
    worker = start_worker()
    seeded = seed_over_http(frontend_http, johns_dir)
    assert frontend_http.post("/v1/jobs", json={"kind": "finetune"}).status_code == 403
    assert operator_http.post("/v1/feedback/batch", json={"items": []}).status_code == 403
    outcome = run_feedback_loop(operator_http, seeded, mobilefacenet_checkpoint)
    print(json.dumps({"promoted": outcome["promoted"], "polls": outcome["polls"], "gate": outcome["gate"]}))
    for process in (api.process, worker):
        assert "Traceback" not in process.log_text(), f"{process.name} logged an error on the happy path"
