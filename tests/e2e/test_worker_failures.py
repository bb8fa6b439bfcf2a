"""What happens to a job when its worker dies, and when someone cancels it: never left `running`."""

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.db import session_scope
from app.tables import FaceEmbedding
from tests.e2e.flow import (
    FINISHED,
    QUICK_FINETUNE,
    Seeded,
    activate,
    ok,
    register_model,
    seed_and_activate,
    seed_over_http,
    start_finetune,
    upload_faces,
    wait_for_job,
    wait_for_success,
)
from tests.e2e.services import ServiceProcess

pytestmark = pytest.mark.slow

# Far more epochs than a test waits for: the job is still training when it is killed or cancelled.
LONG_FINETUNE = {**QUICK_FINETUNE, "epochs": 500}


def _training(job: dict[str, Any]) -> bool:
    progress = job.get("progress") or {}
    return job["status"] in FINISHED or (job["status"] == "running" and progress.get("step") is not None)


def _ready_service(http: httpx.Client, johns_dir: Path, checkpoint: Path) -> Seeded:
    """A third of the johns pairs: these tests need a fine-tune that runs, not one that learns much, and a
    shorter epoch reaches the moment each test waits for sooner (still both labels in every split)."""
    return seed_and_activate(http, seed_over_http(http, johns_dir, every_nth_pair=3), checkpoint)


def _children_of(http: httpx.Client, model_id: str) -> list[dict[str, Any]]:
    return [
        m
        for m in ok(http.get("/v1/models", params={"limit": 100}), 200)["items"]
        if m["parent_id"] == model_id
    ]


def _past_epoch_1(job: dict[str, Any]) -> bool:
    """Epoch 1 ended (and its trainer state was saved): the job reports epoch 2 or later."""
    return job["status"] in FINISHED or (job.get("progress") or {}).get("epoch", 0) >= 2


@pytest.mark.parametrize("heartbeat_timeout_s", [5.0])
def test_a_job_whose_worker_is_killed_after_an_epoch_resumes_after_it(
    http: httpx.Client,
    service_settings: dict[str, str],
    start_worker: Callable[[], ServiceProcess],
    johns_dir: Path,
    mobilefacenet_checkpoint: Path,
) -> None:
    from app.config import Settings
    from app.jobs.training_states import state_path

    worker = start_worker()
    _ready_service(http, johns_dir, mobilefacenet_checkpoint)
    job = start_finetune(http, {**LONG_FINETUNE, "freeze_stem": True})  # half a CPU step: epoch 1 ends sooner
    training = wait_for_job(http, job["id"], until=_past_epoch_1).job
    assert (training["status"], training["attempts"]) == ("running", 1), training

    worker.kill()
    # No worker now: the api's sweeper sees the heartbeat stop and hands the job back (or fails it).
    after_kill = wait_for_job(http, job["id"], until=lambda j: j["status"] != "running", timeout_s=120).job
    assert (after_kill["status"], after_kill["progress"]) == ("queued", None), after_kill
    state = state_path(Settings(data_dir=service_settings["MAGTUNE_DATA_DIR"]), uuid.UUID(job["id"]))
    assert state.is_file(), "the state of the last epoch is kept for the retry"

    start_worker()
    retried = wait_for_job(
        http,
        job["id"],
        until=lambda j: j["status"] in FINISHED or (j["attempts"] >= 2 and "epoch" in (j["progress"] or {})),
    ).job
    assert (retried["status"], retried["attempts"]) == ("running", 2), retried
    assert retried["progress"]["epoch"] >= 2, "the retry went on after the last saved epoch"

    cancel = http.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancel.status_code == 202, cancel.text
    assert wait_for_job(http, job["id"], timeout_s=180).job["status"] == "cancelled"
    assert not state.exists(), "a job that ended leaves no state behind"


def test_a_cancelled_queued_job_never_starts(
    http: httpx.Client,
    start_worker: Callable[[], ServiceProcess],
    johns_dir: Path,
    mobilefacenet_checkpoint: Path,
) -> None:
    worker = start_worker()
    seeded = _ready_service(http, johns_dir, mobilefacenet_checkpoint)
    assert worker.stop() == 0

    job = start_finetune(http, QUICK_FINETUNE)
    cancelled = ok(http.post(f"/v1/jobs/{job['id']}/cancel"), 200)
    assert cancelled["status"] == "cancelled"

    # One consumer takes messages in order: once a job sent after it has run, the cancelled one was seen.
    start_worker()
    later = ok(http.post("/v1/jobs", json={"kind": "reindex", "params": {}}), 202)
    wait_for_success(http, later["id"])
    final = ok(http.get(f"/v1/jobs/{job['id']}"), 200)
    assert (final["status"], final["attempts"], final["started_at"]) == ("cancelled", 0, None), final
    assert _children_of(http, seeded.base_model["id"]) == []


def test_a_cancelled_running_job_stops_at_its_next_step(
    http: httpx.Client,
    start_worker: Callable[[], ServiceProcess],
    johns_dir: Path,
    mobilefacenet_checkpoint: Path,
) -> None:
    worker = start_worker()
    seeded = _ready_service(http, johns_dir, mobilefacenet_checkpoint)
    job = start_finetune(http, LONG_FINETUNE)
    training = wait_for_job(http, job["id"], until=_training).job
    assert training["status"] == "running", training

    cancel = http.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancel.status_code == 202, cancel.text
    assert cancel.json()["cancel_requested"] is True
    final = wait_for_job(http, job["id"], timeout_s=120).job
    assert final["status"] == "cancelled", final
    assert final["finished_at"] is not None
    assert final["progress"]["epoch"] < LONG_FINETUNE["epochs"], "it stopped long before its last epoch"
    assert _children_of(http, seeded.base_model["id"]) == [], "a cancelled fine-tune registers no model"

    # The worker carries on with the next job.
    assert worker.alive()
    later = ok(http.post("/v1/jobs", json={"kind": "reindex", "params": {}}), 202)
    wait_for_success(http, later["id"])


def _embedding_generations(database_url: str, model_id: str) -> dict[uuid.UUID, int]:
    with session_scope(database_url) as session:
        rows = session.execute(
            select(FaceEmbedding.face_id, FaceEmbedding.generation).where(
                FaceEmbedding.model_id == uuid.UUID(model_id)
            )
        )
        return {face_id: generation for face_id, generation in rows}


@pytest.mark.parametrize("heartbeat_timeout_s", [5.0])
def test_a_reindex_whose_worker_is_killed_resumes_with_what_is_missing(
    http: httpx.Client,
    service_settings: dict[str, str],
    start_worker: Callable[[], ServiceProcess],
    johns_dir: Path,
    mobilefacenet_checkpoint: Path,
) -> None:
    faces = {face["id"] for face in upload_faces(http, johns_dir).values()}
    service_settings["MAGTUNE_REINDEX_BATCH_SIZE"] = "2"  # many small batches: the kill lands part-way
    worker = start_worker()
    model = register_model(http, mobilefacenet_checkpoint, "mobilefacenet")
    reindex = activate(http, model["id"], "base")["reindex_job_id"]
    database_url = service_settings["MAGTUNE_DATABASE_URL"]

    def part_way(job: dict[str, Any]) -> bool:
        return job["status"] in FINISHED or (job.get("progress") or {}).get("embedded", 0) >= 6

    assert wait_for_job(http, reindex, until=part_way).job["status"] == "running"
    worker.kill()
    requeued = wait_for_job(http, reindex, until=lambda j: j["status"] != "running", timeout_s=120).job
    assert requeued["status"] == "queued", requeued
    before = _embedding_generations(database_url, model["id"])
    assert 6 <= len(before) < len(faces), "killed part-way, with some batches committed"

    start_worker()
    done = wait_for_success(http, reindex).job
    after = _embedding_generations(database_url, model["id"])

    assert done["attempts"] == 2
    assert done["result"]["embedded"] == len(faces) - len(before), "the retry embedded only what was missing"
    assert {str(face_id) for face_id in after} == faces
    assert {face_id: after[face_id] for face_id in before} == before, (
        "rows written before the kill stay as they were"
    )
    assert ok(http.get("/v1/models/active"), 200)["serving_model_id"] == model["id"]


def test_sigterm_to_the_workers_process_group_lets_the_running_job_finish(
    http: httpx.Client,
    start_worker: Callable[[], ServiceProcess],
    johns_dir: Path,
    mobilefacenet_checkpoint: Path,
) -> None:
    """What systemd's KillMode=control-group does on stop: every process of the group gets SIGTERM. The
    job's child leaves shutdown to the parent, whose warm shutdown waits for the job."""
    import os
    import signal

    worker = start_worker()
    seeded = _ready_service(http, johns_dir, mobilefacenet_checkpoint)
    job = start_finetune(http, QUICK_FINETUNE)
    training = wait_for_job(http, job["id"], until=_training).job
    assert (training["status"], training["attempts"]) == ("running", 1), training

    os.killpg(worker.pid, signal.SIGTERM)
    done = wait_for_job(http, job["id"]).job

    assert (done["status"], done["attempts"]) == ("succeeded", 1), done
    assert len(_children_of(http, seeded.base_model["id"])) == 1
    worker.wait_until(lambda: not worker.alive(), what="exiting after its warm shutdown", timeout_s=60)
