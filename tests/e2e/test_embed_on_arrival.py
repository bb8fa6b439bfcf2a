"""Faces uploaded while a model is active are embedded by a real `magtune worker --queue embed` process, with
no reindex: the api queues one coalesced `embed` job per model in service, and the embed worker's child
process, kept between jobs, embeds them with the model it loaded once."""

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.flow import activate, ok, register_model, wait_embedded, wait_for_success
from tests.e2e.services import ServiceProcess

pytestmark = pytest.mark.slow


def _upload(http: httpx.Client, image: Path) -> dict[str, Any]:
    return ok(http.post("/v1/faces", files={"file": ("face.png", image.read_bytes(), "image/png")}), 201)


def _jobs(http: httpx.Client, kind: str) -> list[dict[str, Any]]:
    return ok(http.get("/v1/jobs", params={"kind": kind, "limit": 100}), 200)["items"]


def _finished_jobs(http: httpx.Client, kind: str, timeout_s: float = 120.0) -> list[dict[str, Any]]:
    """The jobs of `kind` once none is queued or running. An embed job queued for a face that an earlier
    job already embedded still runs (and finds nothing to do), possibly after the faces are all embedded."""
    deadline = time.monotonic() + timeout_s
    while True:
        jobs = _jobs(http, kind)
        if all(job["status"] not in ("queued", "running") for job in jobs) or time.monotonic() > deadline:
            return jobs
        time.sleep(0.2)


def test_faces_uploaded_after_activation_are_embedded_by_the_embed_worker_without_a_reindex(
    http: httpx.Client,
    start_worker: Callable[[], ServiceProcess],
    start_embed_worker: Callable[[], ServiceProcess],
    johns_dir: Path,
    mobilefacenet_checkpoint: Path,
) -> None:
    gpu = start_worker()
    embed = start_embed_worker()
    images = sorted((johns_dir / "aligned_112" / "John_Salley").glob("*.png"))[:5]
    model = register_model(http, mobilefacenet_checkpoint, "mobilefacenet")
    wait_for_success(http, activate(http, model["id"], "base")["reindex_job_id"])

    first = [_upload(http, image)["id"] for image in images[:3]]
    wait_embedded(http, first)
    later = [_upload(http, image)["id"] for image in images[3:]]  # the child and its model are reused
    wait_embedded(http, later)

    assert len(_jobs(http, "reindex")) == 1, "only the activation's reindex: arrivals need none"
    embed_jobs = _finished_jobs(http, "embed")
    assert embed_jobs and all(job["status"] == "succeeded" for job in embed_jobs), embed_jobs
    assert {job["params"]["model"] for job in embed_jobs} == {model["id"]}
    assert sum(job["result"]["embedded"] for job in embed_jobs) == len(first) + len(later)
    active = ok(http.get("/v1/models/active"), 200)
    assert active["id"] == model["id"]
    ran = re.findall(r"\[[^]]*/(ForkPoolWorker-\d+)\] Task magtune\.embed\[\S+\] succeeded", embed.log_text())
    assert len(ran) == len(embed_jobs), "every embed job ran on the embed worker"
    assert set(ran) == {"ForkPoolWorker-1"}, "one child process for every embed job: never recycled"
    assert "magtune.embed[" not in gpu.log_text(), "the gpu worker never receives an embed job"
