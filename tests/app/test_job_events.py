"""GET /v1/jobs/{id}/events: progress as server-sent events, resumable, bounded, holding no connection."""

import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import update

from app.config import Settings
from app.db import session_scope
from app.domain import JobStatus
from app.tables import Job
from tests.app.factories import insert_job, read_job
from tests.app.problems import assert_problem

FAST = {"job_events_poll_s": 0.05, "job_events_heartbeat_s": 0.2}


def parse_events(text: str) -> list[dict[str, Any]]:
    """The stream's events (id, event, data as JSON) and comments, in order."""
    events: list[dict[str, Any]] = []
    for block in text.split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.splitlines():
            if line.startswith(":"):
                fields["comment"] = line[1:].strip()
            else:
                name, _, value = line.partition(": ")
                fields[name] = json.loads(value) if name == "data" else value
        if fields:
            events.append(fields)
    return events


def write_job(settings: Settings, job_id: uuid.UUID, **values: Any) -> None:
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def run_job_later(settings: Settings, job_id: uuid.UUID) -> threading.Thread:
    """A stand-in worker: running, two epochs of progress, one heartbeat-only write, then succeeded."""

    def work() -> None:
        time.sleep(0.3)
        write_job(settings, job_id, status=JobStatus.RUNNING, attempts=1)
        for epoch in (1, 2):
            time.sleep(0.3)
            write_job(settings, job_id, progress={"phase": "epoch", "epoch": epoch, "loss": 1.0 / epoch})
        time.sleep(0.3)
        write_job(settings, job_id, heartbeat_at=Job.created_at)  # changes nothing an event shows
        time.sleep(0.3)
        write_job(settings, job_id, status=JobStatus.SUCCEEDED, result={"model_id": "m"})

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


class TestEvents:
    def test_each_change_then_the_end(
        self, client_with: Callable[..., TestClient], settings: Settings
    ) -> None:
        client = client_with(**FAST)
        job_id = insert_job(settings, kind="finetune", status=JobStatus.QUEUED)
        worker = run_job_later(settings, job_id)

        with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            text = "".join(response.iter_text())
        worker.join()

        events = [e for e in parse_events(text) if "event" in e]
        shown = [
            (e["event"], e["data"]["status"], (e["data"]["progress"] or {}).get("epoch")) for e in events
        ]
        assert shown == [
            ("progress", "queued", None),
            ("progress", "running", None),
            ("progress", "running", 1),
            ("progress", "running", 2),
            ("end", "succeeded", 2),
        ]
        assert events[-1]["data"]["result"] == {"model_id": "m"}
        ids = [int(e["id"]) for e in events]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        assert ids[-1] == read_job(settings, job_id).revision
        assert any(e.get("comment") == "heartbeat" for e in parse_events(text))

    def test_resume_after_last_event_id(
        self, client_with: Callable[..., TestClient], settings: Settings
    ) -> None:
        client = client_with(**FAST)
        job_id = insert_job(settings, kind="finetune", status=JobStatus.RUNNING, progress={"epoch": 1})
        seen = read_job(settings, job_id).revision

        def finish() -> None:
            time.sleep(0.4)
            write_job(settings, job_id, status=JobStatus.SUCCEEDED, result={"ok": True})

        thread = threading.Thread(target=finish, daemon=True)
        thread.start()
        with client.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": str(seen)}) as r:
            events = [e for e in parse_events("".join(r.iter_text())) if "event" in e]
        thread.join()

        # The state the client had is not sent again: only what came after it.
        assert [(e["event"], e["data"]["status"]) for e in events] == [("end", "succeeded")]
        assert int(events[0]["id"]) > seen

    def test_a_finished_job_ends_at_once(self, client: TestClient, settings: Settings) -> None:
        job_id = insert_job(settings, kind="evaluate", status=JobStatus.FAILED, error={"type": "x"})
        revision = read_job(settings, job_id).revision
        for last in (None, str(revision)):
            headers = {"Last-Event-ID": last} if last else {}
            response = client.get(f"/v1/jobs/{job_id}/events", headers=headers)
            events = [e for e in parse_events(response.text) if "event" in e]
            assert [(e["event"], e["data"]["status"]) for e in events] == [("end", "failed")]

    def test_lifetime_bound_ends_the_stream(
        self, client_with: Callable[..., TestClient], settings: Settings
    ) -> None:
        client = client_with(**FAST, job_events_max_lifetime_s=0.3)
        job_id = insert_job(settings, kind="finetune", status=JobStatus.RUNNING)
        started = time.monotonic()
        response = client.get(f"/v1/jobs/{job_id}/events")
        assert response.status_code == 200
        assert time.monotonic() - started < 5
        assert [e["event"] for e in parse_events(response.text) if "event" in e] == ["progress"]


class TestRefusals:
    def test_unknown_job_is_404(self, client: TestClient) -> None:
        assert_problem(client.get(f"/v1/jobs/{uuid.uuid4()}/events"), 404, "unknown-job")

    def test_bad_last_event_id_is_422(self, client: TestClient, settings: Settings) -> None:
        job_id = insert_job(settings, kind="finetune", status=JobStatus.SUCCEEDED)
        for bad in ("-1", "abc", "1.5"):
            response = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": bad})
            assert_problem(response, 422, "invalid-last-event-id")

    def test_streams_over_the_bound_get_503(
        self, client_with: Callable[..., TestClient], settings: Settings
    ) -> None:
        client = client_with(**FAST, job_events_max_streams=1)
        running = insert_job(settings, kind="finetune", status=JobStatus.RUNNING)
        with client.stream("GET", f"/v1/jobs/{running}/events") as first:
            assert first.status_code == 200
            next(first.iter_lines())
            refused = client.get(f"/v1/jobs/{running}/events")
            assert_problem(refused, 503, "too-many-streams")
            assert refused.headers["retry-after"] == "5"
        write_job(settings, running, status=JobStatus.CANCELLED)
        # The slot was given back when the first stream closed.
        assert client.get(f"/v1/jobs/{running}/events").status_code == 200
