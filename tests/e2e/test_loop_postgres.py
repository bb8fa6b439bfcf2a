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
    http: httpx.Client,
    start_worker: Callable[[], ServiceProcess],
    johns_dir: Path,
    mobilefacenet_checkpoint: Path,
) -> None:
    worker = start_worker()
    seeded = seed_over_http(http, johns_dir)
    outcome = run_feedback_loop(http, seeded, mobilefacenet_checkpoint)
    print(json.dumps({"promoted": outcome["promoted"], "polls": outcome["polls"], "gate": outcome["gate"]}))
    for process in (api.process, worker):
        assert "Traceback" not in process.log_text(), f"{process.name} logged an error on the happy path"
