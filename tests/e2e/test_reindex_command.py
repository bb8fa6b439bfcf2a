"""`magtune reindex` against a running api and worker: it starts a reindex job and follows it to the end."""

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.e2e.flow import activate, ok, register_model, wait_for_success
from tests.e2e.services import RunningApi, ServiceProcess, magtune_command

pytestmark = pytest.mark.slow


def _reindex(api_url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        magtune_command("reindex", "--api", api_url, "--poll-interval", "0.2", *extra),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_reindex_command_embeds_every_face_with_the_active_model(
    api: RunningApi,
    http: httpx.Client,
    start_worker: Callable[[], ServiceProcess],
    johns_dir: Path,
    mobilefacenet_checkpoint: Path,
) -> None:
    start_worker()  # the gpu worker only: faces stored after the activation wait for a reindex
    images = sorted((johns_dir / "aligned_112" / "John_Simm").glob("*.png"))[:6]

    def upload(image: Path) -> str:
        return ok(http.post("/v1/faces", files={"file": ("face.png", image.read_bytes(), "image/png")}), 201)[
            "id"
        ]

    for image in images[:4]:
        upload(image)
    model = register_model(http, mobilefacenet_checkpoint, "mobilefacenet")
    wait_for_success(http, activate(http, model["id"], "base")["reindex_job_id"])
    later = {upload(image) for image in images[4:]}

    done = _reindex(api.url, "--wait", "--json")

    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert job["kind"] == "reindex" and job["status"] == "succeeded"
    assert job["params"]["model"] == model["id"]
    assert job["result"]["embedded"] == len(later), "what the activation's reindex embedded is not redone"
    assert (job["result"]["skipped"], job["result"]["still_missing"]) == (0, 0)

    followed = _reindex(api.url, "--wait")
    assert followed.returncode == 0, followed.stderr
    last_progress = followed.stderr.splitlines()[-1]
    assert last_progress.split()[0] == "succeeded", "--wait reports the job's progress on stderr"
    summary, *result = followed.stdout.splitlines()
    assert re.fullmatch(r"job [0-9a-f-]{36} \(reindex\): succeeded", summary), summary
    again = json.loads("\n".join(result))
    assert (again["embedded"], again["still_missing"]) == (0, 0), "a reindex embeds only what is missing"


def test_reindex_command_reports_a_refusal_with_the_api_problem(api: RunningApi) -> None:
    done = _reindex(api.url, "--json")  # no model is active yet

    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith("magtune reindex: error: POST /v1/jobs: 409 No active model "), line
    assert done.stdout == ""
