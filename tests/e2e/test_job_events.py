"""GET /v1/jobs/{id}/events on real processes: `magtune up` (the embedded default) runs real jobs, a client
follows them through the stream to their end, and resumes with Last-Event-ID."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.flow import face_images, ok
from tests.e2e.services import RunningApi, client_with_key

pytestmark = pytest.mark.slow


@pytest.fixture
def timing_settings(timing_settings: dict[str, str]) -> dict[str, str]:
    """The stream polls often and the reindex writes its progress after each face, so its `embedding` phase
    spans many polls however fast the machine is: the stream coalesces writes between two polls."""
    return {**timing_settings, "MAGTUNE_JOB_EVENTS_POLL_S": "0.05", "MAGTUNE_REINDEX_BATCH_SIZE": "1"}


def follow(http: httpx.Client, job_id: str, last_event_id: str | None = None) -> list[dict[str, Any]]:
    """Every event of the job's stream, read until the server closes it (after the `end` event)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
    events: list[dict[str, Any]] = []
    fields: dict[str, Any] = {}
    with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=300) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                if "event" in fields:
                    events.append(fields)
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = json.loads(value) if name == "data" else value
    return events


def test_a_client_follows_real_jobs_to_their_end_and_resumes(
    start_up: Callable[[Path], RunningApi], tmp_path: Path, johns_dir: Path, mobilefacenet_checkpoint: Path
) -> None:
    up = start_up(tmp_path / "data")
    assert up.admin_key is not None
    with client_with_key(up.url, up.admin_key) as http:
        for image in face_images(johns_dir)[:12]:
            files = {"file": ("face.png", (johns_dir / image).read_bytes(), "image/png")}
            ok(http.post("/v1/faces", files=files), 200, 201)
        files = {"file": ("base.pt", mobilefacenet_checkpoint.read_bytes(), "application/octet-stream")}
        model = ok(http.post("/v1/models", files=files, data={"arch": "mobilefacenet"}), 202)

        validation = follow(http, model["validation_job_id"])
        assert validation[-1]["event"] == "end" and validation[-1]["data"]["status"] == "succeeded"
        assert all(e["event"] == "progress" for e in validation[:-1])

        activation = ok(http.post(f"/v1/models/{model['id']}/activate", json={"reason": "base"}), 200)
        reindex_id = activation["reindex_job_id"]
        events = follow(http, reindex_id)

    job = ok(httpx.get(f"{up.url}/v1/jobs/{reindex_id}", headers=http.headers), 200)
    assert [e["event"] for e in events][-1] == "end"
    final = events[-1]["data"]
    assert (final["status"], final["result"]) == ("succeeded", job["result"])
    phases = [(e["data"]["progress"] or {}).get("phase") for e in events]
    assert "embedding" in phases, phases
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(a["data"] != b["data"] for a, b in itertools.pairwise(events)), "a repeated event"

    with client_with_key(up.url, up.admin_key) as http:
        # Resuming after the last event: just the end again, so the client knows the stream is over.
        again = follow(http, reindex_id, last_event_id=events[-1]["id"])
        assert [(e["event"], e["id"]) for e in again] == [("end", events[-1]["id"])]
        # Resuming after an earlier one: the current state, which is the end.
        later = follow(http, reindex_id, last_event_id=events[0]["id"])
        assert [e["data"]["status"] for e in later] == ["succeeded"]
