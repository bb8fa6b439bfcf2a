"""`magtune reindex` against a running api and worker: it starts a reindex job and follows it to the end."""

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.e2e.flow import activate, ok, register_model, wait_for_success
from tests.e2e.services import RunningApi, ServiceProcess, magtune_command

pytestmark = pytest.mark.slow


def _reindex(api_url: str, key: str | None, *extra: str) -> subprocess.CompletedProcess[str]:
    """`magtune reindex` with the key in MAGTUNE_API_KEY (none: the variable unset)."""
    env = {name: value for name, value in os.environ.items() if name != "MAGTUNE_API_KEY"}
    if key is not None:
        env["MAGTUNE_API_KEY"] = key
    return subprocess.run(
        magtune_command("reindex", "--api", api_url, "--poll-interval", "0.2", *extra),
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_reindex_command_embeds_every_face_with_the_active_model(
    api: RunningApi,
    http: httpx.Client,
    issue_key: Callable[..., str],
    start_worker: Callable[[], ServiceProcess],
    johns_dir: Path,
    mobilefacenet_checkpoint: Path,
) -> None:
    operator = issue_key("jobs:read", "jobs:write")
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

    done = _reindex(api.url, operator, "--wait", "--json")

    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert job["kind"] == "reindex" and job["status"] == "succeeded"
    assert job["params"]["model"] == model["id"]
    assert job["result"]["embedded"] == len(later), "what the activation's reindex embedded is not redone"
    assert (job["result"]["skipped"], job["result"]["still_missing"]) == (0, 0)

    followed = _reindex(api.url, operator, "--wait")
    assert followed.returncode == 0, followed.stderr
    last_progress = followed.stderr.splitlines()[-1]
    assert last_progress.split()[0] == "succeeded", "--wait reports the job's progress on stderr"
    summary, *result = followed.stdout.splitlines()
    assert re.fullmatch(r"job [0-9a-f-]{36} \(reindex\): succeeded", summary), summary
    again = json.loads("\n".join(result))
    assert (again["embedded"], again["still_missing"]) == (0, 0), "a reindex embeds only what is missing"


def test_reindex_command_reports_a_refusal_with_the_api_problem(
    api: RunningApi, issue_key: Callable[..., str]
) -> None:
    done = _reindex(api.url, issue_key("jobs:write"), "--json")  # no model is active yet

    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith("magtune reindex: error: POST /v1/jobs: 409 No active model "), line
    assert done.stdout == ""


def test_reindex_command_says_what_is_wrong_with_its_key(
    api: RunningApi, issue_key: Callable[..., str]
) -> None:
    reader = issue_key("jobs:read")
    reader_id = reader.split("_")[1]
    cases = {
        None: "401 Unauthenticated no key: send Authorization: Bearer <key> (no API key given: set "
        "MAGTUNE_API_KEY or pass --api-key)",
        reader: f"403 Insufficient scope this operation needs scope jobs:write; key {reader_id} does "
        "not hold it (the API key lacks the scope named above: use a key that holds it)",
    }
    for key, expected in cases.items():
        done = _reindex(api.url, key, "--json")

        assert done.returncode == 2
        assert done.stderr.splitlines() == [f"magtune reindex: error: POST /v1/jobs: {expected}"]
        if key is not None:
            assert key.split("_", 2)[2] not in done.stderr
