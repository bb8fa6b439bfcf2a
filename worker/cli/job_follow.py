"""Following a job on a running api until it finishes, as the frontend would: by polling its row."""

from __future__ import annotations

import sys
import time
from typing import Any

from app.domain import FINISHED_JOB_STATUSES
from worker.cli.api_client import ApiClient

FINISHED = FINISHED_JOB_STATUSES


def follow_job(client: ApiClient, job_id: str, *, poll_interval_s: float, quiet: bool) -> dict[str, Any]:
    """Poll GET /v1/jobs/{id} until the job has finished; progress lines go to stderr unless `quiet`."""
    last_line = ""
    while True:
        _status, job = client.get_json(f"/v1/jobs/{job_id}")
        line = describe_progress(job)
        if not quiet and line != last_line:
            print(line, file=sys.stderr, flush=True)
            last_line = line
        if job["status"] in FINISHED:
            return job
        time.sleep(poll_interval_s)


def describe_progress(job: dict[str, Any]) -> str:
    progress = job.get("progress") or {}
    parts = [f"{job['status']}"]
    if progress.get("phase"):
        parts.append(str(progress["phase"]))
    for done, total in (("epoch", "epochs"), ("step", "steps"), ("done", "total")):
        if progress.get(done) is not None and progress.get(total):
            parts.append(f"{done} {progress[done]}/{progress[total]}")
    return " ".join(parts)
