"""Real outages under real `magtune serve` and `magtune worker` processes: PostgreSQL and Redis really stopped
and started again, and the blob store's folder replaced by a file, while the processes run.

The servers are private (tests/e2e/private_services.py), so stopping them touches no other test. Starting
the processes, registering and activating the model costs most of this file's time, so one set serves every
test here, in file order: each test leaves the servers running and the blob store in place.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Connection, exists, func, insert, select

from app.db import get_engine, session_scope
from app.tables import Face, FaceEmbedding, Job
from tests.app.problems import assert_problem
from tests.e2e.conftest import SERVICES, WORKER_READY, Launcher, migrated, quick_timing, start_api
from tests.e2e.flow import FINISHED, activate, face_images, ok, register_model, wait_for_job, wait_for_success
from tests.e2e.private_services import PrivatePostgres, PrivateRedis, outage, private_postgres, private_redis
from tests.e2e.services import RunningApi, ServiceProcess, client_with_key
from tests.keys import bearer, issue_test_key

pytestmark = pytest.mark.slow

RECOVERY_S = 15.0
JOB_S = 90.0
REINDEX = {"kind": "reindex", "params": {}}
FACES_FOR_THE_REINDEX = 10  # one per batch: the job is held at the third (_hold_the_third_face)


@dataclass
class Stack:
    postgres: PrivatePostgres
    redis: PrivateRedis
    settings: dict[str, str]
    api: RunningApi
    key: str
    model_id: str
    launcher: Launcher
    worker: ServiceProcess

    @property
    def database_url(self) -> str:
        return self.settings["MAGTUNE_DATABASE_URL"]

    @property
    def blob_dir(self) -> Path:
        return Path(self.settings["MAGTUNE_DATA_DIR"]) / "blobs"

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.api.url, timeout=30.0, headers=bearer(self.key), **kwargs)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, mobilefacenet_checkpoint: Path) -> Iterator[Stack]:
    """Private servers, the api and a gpu worker on them, and the MobileFaceNet model active (no faces yet).

    A lost message is re-sent 2 s after its send (MAGTUNE_JOB_REQUEUE_AFTER_S), and a reindex embeds one
    face per transaction, so an outage lands between its batches."""
    workdir = tmp_path_factory.mktemp("outages")
    with private_postgres() as postgres, private_redis() as redis_server:
        settings = {
            "MAGTUNE_DATABASE_URL": postgres.create_database("magtune"),
            "MAGTUNE_BROKER_URL": redis_server.url,
            "MAGTUNE_DATA_DIR": str(workdir / "data"),
            "MAGTUNE_JOB_REQUEUE_AFTER_S": "2",
            "MAGTUNE_REINDEX_BATCH_SIZE": "1",
            **quick_timing(),
        }
        migrated(settings, workdir)
        launcher = Launcher(workdir / "services")
        try:
            worker = launcher("worker", ["worker"], settings)
            api = start_api(launcher, settings)
            worker.wait_for_log(WORKER_READY)
            key = issue_test_key(settings["MAGTUNE_DATABASE_URL"])
            with client_with_key(api.url, key) as http:
                model = register_model(http, mobilefacenet_checkpoint, "mobilefacenet")
                wait_for_success(http, activate(http, model["id"], "base")["reindex_job_id"])
            yield Stack(postgres, redis_server, settings, api, key, model["id"], launcher, worker)
        finally:
            launcher.stop_all()
            get_engine(settings["MAGTUNE_DATABASE_URL"]).dispose()


@pytest.fixture(autouse=True)
def _logs_on_failure(request: pytest.FixtureRequest, stack: Stack) -> None:
    """The processes' logs go into the report of whichever test fails (tests/e2e/conftest.py)."""
    request.node.stash[SERVICES] = stack.launcher.started


def wait_until_serving(http: httpx.Client) -> None:
    """The api answers again on its own after an outage (its pool replaces the dead connections)."""
    deadline = time.monotonic() + RECOVERY_S
    while http.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, f"the api is not ready {RECOVERY_S:.0f} s after the outage"
        time.sleep(0.2)


def upload(http: httpx.Client, image: Path) -> httpx.Response:
    return http.post("/v1/faces", files={"file": (image.name, image.read_bytes(), "image/png")})


def test_postgres_stopped_during_traffic_gives_503s_on_one_connection_and_the_api_recovers(
    stack: Stack,
) -> None:
    peers: set[object] = set()

    def note_peer(response: httpx.Response) -> None:
        stream = response.extensions.get("network_stream")
        if stream is not None:
            peers.add(stream.get_extra_info("client_addr"))

    with stack.client(event_hooks={"response": [note_peer]}) as http:
        assert http.get("/v1/faces").status_code == 200
        with outage(stack.postgres):
            during = [http.get("/v1/faces") for _ in range(10)]
            during.append(http.post("/v1/jobs", json=REINDEX))
            ready = http.get("/readyz")
        wait_until_serving(http)
        after = http.get("/v1/faces")

    for response in during:
        assert_problem(response, 503, "database-unavailable")
        assert response.headers["retry-after"] == "5"
    assert ready.status_code == 503 and ready.json()["down"] == ["database"]
    assert after.status_code == 200, after.text
    assert len(peers) == 1, f"every request went over one keep-alive connection, not {len(peers)}"
    assert stack.api.process.alive(), "the api recovered without a restart"


def test_postgres_stopped_during_a_reindex_ends_succeeded_with_each_face_embedded_once(
    stack: Stack, johns_dir: Path
) -> None:
    """Stopped while the job has committed two faces and waits on the third, and kept down until the job's own
    work has met the outage: the attempt hands the job back, and the next one embeds exactly the faces still
    missing."""
    images = [johns_dir / name for name in face_images(johns_dir)[:FACES_FOR_THE_REINDEX]]
    with stack.client() as http:
        faces = {ok(upload(http, image), 200, 201)["id"] for image in images}
        hold, missing = _hold_the_third_face(stack)
        try:
            job = ok(http.post("/v1/jobs", json=REINDEX), 202)
            part_way = wait_for_job(http, job["id"], until=_embedded_some, timeout_s=JOB_S).job
            assert part_way["status"] == "running", "the outage comes while the job runs"
            with outage(stack.postgres):
                stack.worker.wait_for_log(rf"job {job['id']} \(reindex\) met an outage", timeout_s=JOB_S)
        finally:
            hold.invalidate()  # the outage ended its transaction; the row it held was never committed
            hold.close()
        before = _embedded_by(stack)
        wait_until_serving(http)
        done = wait_for_success(http, job["id"], timeout_s=JOB_S).job
        after = _embedded_by(stack)

    assert done["attempts"] == 2, done
    assert faces <= set(after.stored) and 0 < len(before.embedded) < len(before.stored), before
    assert done["result"]["embedded"] == len(before.stored) - len(before.embedded), "only what was missing"
    assert done["result"]["embedded"] == missing - 2, "the first attempt stopped at the held third face"
    assert Counter(after.embedded) == Counter(after.stored), "every stored face embedded once by the model"


def _hold_the_third_face(stack: Stack) -> tuple[Connection, int]:
    """An open transaction holding an uncommitted embedding row of the third face the job will embed (it goes
    by (created_at, id), one face a transaction). The job's insert of that face waits on the row, so however
    fast or slow the machine, the job stops with exactly two faces committed until the outage ends it.
    Returns the connection and how many faces the job has to embed."""
    model = uuid.UUID(stack.model_id)
    embedded = exists().where(FaceEmbedding.face_id == Face.id, FaceEmbedding.model_id == model)
    connection = get_engine(stack.database_url).connect()
    missing = connection.scalars(select(Face.id).where(~embedded).order_by(Face.created_at, Face.id)).all()
    held = insert(FaceEmbedding).values(face_id=missing[2], model_id=model, vector=b"", quality=0.0)
    connection.execute(held)
    return connection, len(missing)


def _embedded_some(job: dict[str, Any]) -> bool:
    return job["status"] in FINISHED or (job.get("progress") or {}).get("embedded", 0) >= 2


@dataclass(frozen=True)
class Embedded:
    stored: list[str]
    embedded: list[str]  # the faces of the model's embedding rows, one entry per row


def _embedded_by(stack: Stack) -> Embedded:
    model = uuid.UUID(stack.model_id)
    with session_scope(stack.database_url) as session:
        rows = session.scalars(select(FaceEmbedding.face_id).where(FaceEmbedding.model_id == model)).all()
        stored = session.scalars(select(Face.id)).all()
    return Embedded([str(face) for face in stored], [str(face) for face in rows])


def test_a_job_created_while_redis_is_down_is_stored_and_runs_once_redis_is_back(stack: Stack) -> None:
    with stack.client() as http:
        with outage(stack.redis):
            created = http.post("/v1/jobs", json=REINDEX)
            ready = http.get("/readyz")
            with session_scope(stack.database_url) as session:
                stored = session.get(Job, uuid.UUID(ok(created, 202)["id"]))
                assert stored is not None
                sent_at = stored.enqueued_at
        done = wait_for_success(http, created.json()["id"], timeout_s=JOB_S).job

    assert created.json()["status"] == "queued"
    assert sent_at is None, "nothing was sent: the broker was down"
    assert ready.status_code == 503 and ready.json()["down"] == ["broker"]
    assert done["attempts"] == 1, done


def test_an_unwritable_blob_store_is_a_503_keeps_nothing_and_recovers_without_a_restart(
    stack: Stack, johns_dir: Path
) -> None:
    image = johns_dir / face_images(johns_dir)[-1]
    away = stack.blob_dir.with_name("blobs-away")
    before = _count_faces(stack)
    with stack.client() as http:
        stack.blob_dir.rename(away)
        stack.blob_dir.write_bytes(b"")  # a file where the folder was: no write under it, root's included
        try:
            refused = upload(http, image)
            ready = http.get("/readyz")
            while_down = _count_faces(stack)
        finally:
            stack.blob_dir.unlink()
            away.rename(stack.blob_dir)
        stored = upload(http, image)

    assert_problem(refused, 503, "storage-unavailable")
    assert ready.status_code == 503 and ready.json()["down"] == ["blob_store"]
    assert while_down == before, "the refused upload left no face row"
    assert list(stack.blob_dir.rglob(".incoming-*")) == [], "nor any half-stored file"
    assert stored.status_code == 201, stored.text
    assert _count_faces(stack) == before + 1


def _count_faces(stack: Stack) -> int:
    with session_scope(stack.database_url) as session:
        return session.scalar(select(func.count()).select_from(Face)) or 0
