"""/v1/jobs and the sweeper, against the real PostgreSQL and Redis."""

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.config import Settings
from app.db import session_scope
from app.jobs.params import DEFAULT_DISTILL_WEIGHT, DEFAULT_MARGIN
from app.jobs.service import create_job
from app.jobs.sweeper import start_background_sweeper, sweep_once
from app.jobs.training_states import state_path
from app.queue import make_celery, send_job
from app.tables import Job
from tests.app.factories import activate_directly, insert_job, insert_model, read_job
from tests.app.problems import assert_problem
from tests.keys import bearer, issue_test_key
from tests.queues import QueueProbe
from tests.services import CLOSED_PORT_BROKER


@pytest.fixture
def active_model(settings: Settings) -> uuid.UUID:
    model_id = insert_model(settings)
    activate_directly(settings, model_id)
    return model_id


class TestCreateJob:
    def test_finetune_defaults_are_resolved_and_stored(
        self, client: TestClient, active_model: uuid.UUID, broker: QueueProbe
    ) -> None:
        response = client.post("/v1/jobs", json={"kind": "finetune"})

        assert response.status_code == 202
        body = response.json()
        assert response.headers["location"] == f"/v1/jobs/{body['id']}"
        assert body["status"] == "queued"
        assert body["kind"] == "finetune"
        assert body["params"] == {
            "base_model": str(active_model),
            "epochs": 10,
            "learning_rate": 1e-4,
            "batch_size": 16,
            "margin": DEFAULT_MARGIN,
            "seed": 0,
            "auto_promote": True,
            "patience": 3,
            "distill_weight": DEFAULT_DISTILL_WEIGHT,
            "freeze_stem": False,
            "selection": "val",
            "interpolation": 0.5,
        }
        assert body["attempts"] == 0
        assert body["max_attempts"] == 3
        assert body["cancel_requested"] is False
        assert body["enqueued_at"] is not None
        assert broker.sent_job_ids() == [body["id"]]

    def test_explicit_params_are_kept(
        self, client: TestClient, settings: Settings, active_model: uuid.UUID
    ) -> None:
        other = insert_model(settings)
        params = {
            "base_model": str(other),
            "epochs": 3,
            "learning_rate": 0.001,
            "margin": 1.0,
            "patience": 2,
            "selection": "interpolate",
            "interpolation": 0.3,
        }

        body = client.post("/v1/jobs", json={"kind": "finetune", "params": params}).json()

        assert body["params"]["base_model"] == str(other)
        assert body["params"]["epochs"] == 3
        assert body["params"]["learning_rate"] == 0.001
        assert body["params"]["margin"] == 1.0
        assert body["params"]["patience"] == 2
        assert body["params"]["selection"] == "interpolate"
        assert body["params"]["interpolation"] == 0.3

    def test_evaluate_and_reindex(
        self, client: TestClient, settings: Settings, active_model: uuid.UUID
    ) -> None:
        other = insert_model(settings)

        evaluate = client.post("/v1/jobs", json={"kind": "evaluate", "params": {"compare_to": str(other)}})
        reindex = client.post("/v1/jobs", json={"kind": "reindex", "params": {}})

        assert evaluate.status_code == 202
        assert evaluate.json()["params"] == {
            "model": str(active_model),
            "split": "test",
            "compare_to": str(other),
            "calibrate": False,
        }
        assert reindex.status_code == 202
        assert reindex.json()["params"] == {"model": str(active_model)}

    @pytest.mark.parametrize(
        ("body", "named"),
        [
            ({"kind": "train"}, "kind"),
            ({"kind": "validate_model", "params": {}}, "kind"),
            ({"kind": "finetune", "params": {"epochz": 3}}, "epochz"),
            ({"kind": "evaluate", "params": {"split": "train"}}, "split"),
            ({"kind": "evaluate", "params": {"calibrate": True}}, "calibrate"),
            ({"kind": "evaluate", "params": {"split": "test", "calibrate": True}}, "calibrate"),
            ({"kind": "evaluate", "params": {"split": "val", "calibrate": "yes"}}, "calibrate"),
            ({"kind": "finetune", "params": {"epochs": "ten"}}, "epochs"),
            ({"kind": "finetune", "params": {"epochs": "10"}}, "epochs"),
            ({"kind": "finetune", "params": {"epochs": 0}}, "epochs"),
            ({"kind": "finetune", "params": {"learning_rate": "fast"}}, "learning_rate"),
            ({"kind": "finetune", "params": {"auto_promote": "yes"}}, "auto_promote"),
            ({"kind": "finetune", "params": {"selection": "best"}}, "selection"),
            (
                {"kind": "finetune", "params": {"selection": "interpolate", "interpolation": 0}},
                "interpolation",
            ),
            ({"kind": "finetune", "params": {"interpolation": 1.01}}, "interpolation"),
            ({"kind": "finetune", "params": {"interpolation": "half"}}, "interpolation"),
            ({"kind": "reindex", "params": {"model": "not-a-uuid"}}, "model"),
        ],
    )
    def test_bad_input_is_a_422_naming_the_field(
        self, client: TestClient, active_model: uuid.UUID, broker: QueueProbe, body: dict, named: str
    ) -> None:
        response = client.post("/v1/jobs", json=body)

        problem = assert_problem(response, 422, "validation-error")
        assert named in problem["detail"]
        if named != "kind":  # an unknown kind is reported on the body, as the tag of the union
            assert any(named in [str(part) for part in error["loc"]] for error in problem["errors"])
        assert len(broker.sent_job_ids()) == 0

    def test_without_an_active_model_is_a_409(self, client: TestClient) -> None:
        response = client.post("/v1/jobs", json={"kind": "finetune"})

        assert_problem(response, 409, "no-active-model")

    def test_unknown_model_is_a_404(self, client: TestClient, active_model: uuid.UUID) -> None:
        response = client.post("/v1/jobs", json={"kind": "reindex", "params": {"model": str(uuid.uuid4())}})

        assert_problem(response, 404, "unknown-model")

    @pytest.mark.parametrize("status", ["validating", "invalid"])
    def test_model_not_ready_is_a_409(self, client: TestClient, settings: Settings, status: str) -> None:
        model = insert_model(settings, status=status)

        response = client.post("/v1/jobs", json={"kind": "evaluate", "params": {"model": str(model)}})

        assert_problem(response, 409, "model-not-ready")

    def test_broker_down_still_accepts_and_leaves_the_job_for_the_sweeper(
        self, settings: Settings, active_model: uuid.UUID
    ) -> None:
        from app.main import create_app

        down = settings.model_copy(update={"broker_url": CLOSED_PORT_BROKER})
        key = issue_test_key(settings.database_url)
        with TestClient(create_app(down, run_sweeper=False), headers=bearer(key)) as client:
            response = client.post("/v1/jobs", json={"kind": "reindex"})

        assert response.status_code == 202
        job = read_job(settings, uuid.UUID(response.json()["id"]))
        assert job.status == "queued"
        assert job.enqueued_at is None


def test_a_job_is_sent_only_once_its_transaction_commits(
    settings: Settings, active_model: uuid.UUID, broker: QueueProbe
) -> None:
    with session_scope(settings.database_url) as session:
        create_job(session=session, settings=settings, kind="reindex", params={})
        session.rollback()
    assert len(broker.sent_job_ids()) == 0

    with session_scope(settings.database_url) as session:
        job = create_job(session=session, settings=settings, kind="reindex", params={})
        session.flush()
        assert len(broker.sent_job_ids()) == 0
    assert broker.sent_job_ids() == [str(job.id)]


class TestReadJobs:
    def test_get_job(self, client: TestClient, settings: Settings) -> None:
        job_id = insert_job(settings, kind="evaluate", progress={"phase": "scoring"})

        body = client.get(f"/v1/jobs/{job_id}").json()

        assert body["id"] == str(job_id)
        assert body["progress"] == {"phase": "scoring"}
        for key in ("result", "error", "attempts", "created_at", "started_at", "finished_at", "heartbeat_at"):
            assert key in body

    def test_unknown_job_is_a_404_problem(self, client: TestClient) -> None:
        response = client.get(f"/v1/jobs/{uuid.uuid4()}")

        assert_problem(response, 404, "unknown-job")

    def test_list_filters_and_pages(self, client: TestClient, settings: Settings) -> None:
        finetunes = [insert_job(settings, kind="finetune") for _ in range(3)]
        insert_job(settings, kind="evaluate")
        insert_job(settings, kind="finetune", status="succeeded")

        first = client.get("/v1/jobs", params={"kind": "finetune", "status": "queued", "limit": 2}).json()
        second = client.get(
            "/v1/jobs", params={"kind": "finetune", "status": "queued", "cursor": first["next_cursor"]}
        ).json()

        assert len(first["items"]) == 2
        assert second["next_cursor"] is None
        seen = [item["id"] for item in first["items"] + second["items"]]
        assert seen == [str(job_id) for job_id in reversed(finetunes)]
        exploded = assert_problem(
            client.get("/v1/jobs", params={"status": "exploded"}), 422, "validation-error"
        )
        assert exploded["errors"][0]["loc"] == ["query", "status"]


class TestCancel:
    def test_a_queued_job_is_cancelled_at_once_and_never_starts(
        self, client: TestClient, settings: Settings
    ) -> None:
        job_id = insert_job(settings)

        response = client.post(f"/v1/jobs/{job_id}/cancel")

        assert response.status_code == 200
        assert response.json()["status"] == "cancelled"
        assert response.json()["finished_at"] is not None
        with session_scope(settings.database_url) as session:  # the worker's claim is conditional on queued
            claimed = session.execute(
                update(Job).where(Job.id == job_id, Job.status == "queued").values(status="running")
            ).rowcount
        assert claimed == 0
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
        again = assert_problem(client.post(f"/v1/jobs/{job_id}/cancel"), 409, "job-finished")
        assert again["job_status"] == "cancelled"

    def test_a_running_job_is_flagged(self, client: TestClient, settings: Settings) -> None:
        job_id = insert_job(settings, status="running", attempts=1, started_at=datetime.now(UTC))

        response = client.post(f"/v1/jobs/{job_id}/cancel")

        assert response.status_code == 202
        assert response.json()["status"] == "running"
        assert response.json()["cancel_requested"] is True

    @pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
    def test_a_finished_job_is_a_409(self, client: TestClient, settings: Settings, status: str) -> None:
        job_id = insert_job(settings, status=status, finished_at=datetime.now(UTC))

        response = client.post(f"/v1/jobs/{job_id}/cancel")

        assert assert_problem(response, 409, "job-finished")["job_status"] == status
        assert read_job(settings, job_id).status == status

    def test_unknown_job_is_a_404(self, client: TestClient) -> None:
        assert_problem(client.post(f"/v1/jobs/{uuid.uuid4()}/cancel"), 404, "unknown-job")


NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


class TestSweeper:
    def test_re_sends_queued_jobs_whose_message_may_be_lost(
        self, settings: Settings, broker: QueueProbe
    ) -> None:
        never_sent = insert_job(settings, created_at=ago(600))
        sent_long_ago = insert_job(
            settings, created_at=ago(900), enqueued_at=ago(settings.job_requeue_after_s + 1)
        )
        sent_recently = insert_job(settings, created_at=ago(60), enqueued_at=ago(30))
        just_created = insert_job(settings, created_at=ago(1))

        report = sweep_once(settings, now=NOW)

        assert set(report.resent) == {never_sent, sent_long_ago}
        assert sorted(broker.sent_job_ids()) == sorted(str(job_id) for job_id in (never_sent, sent_long_ago))
        assert read_job(settings, sent_recently).enqueued_at == ago(30)
        assert read_job(settings, just_created).enqueued_at is None
        assert read_job(settings, never_sent).status == "queued"

    def test_recovers_jobs_of_lost_workers(self, settings: Settings, broker: QueueProbe) -> None:
        stale = ago(settings.job_heartbeat_timeout_s + 1)
        retry = insert_job(
            settings,
            status="running",
            attempts=1,
            started_at=stale,
            heartbeat_at=stale,
            progress={"phase": "train", "epoch": 2},
        )
        spent = insert_job(settings, status="running", attempts=3, started_at=stale, heartbeat_at=stale)
        cancelling = insert_job(
            settings,
            status="running",
            attempts=1,
            started_at=stale,
            heartbeat_at=stale,
            cancel_requested=True,
        )
        alive = insert_job(settings, status="running", attempts=1, started_at=stale, heartbeat_at=ago(5))

        report = sweep_once(settings, now=NOW)

        assert report.requeued == [retry]
        assert report.failed == [spent]
        assert report.cancelled == [cancelling]
        assert broker.sent_job_ids() == [str(retry)]
        requeued = read_job(settings, retry)
        assert requeued.status == "queued"
        assert requeued.progress is None, "a queued job shows no progress of the attempt that died"
        failed = read_job(settings, spent)
        assert failed.status == "failed"
        assert failed.error["type"] == "worker-lost"
        assert failed.error["title"] == "Worker lost"
        assert failed.error["detail"]
        assert failed.finished_at == NOW
        assert read_job(settings, cancelling).status == "cancelled"
        assert read_job(settings, alive).status == "running"

    def test_concurrent_sweeps_send_each_job_once(self, settings: Settings, broker: QueueProbe) -> None:
        jobs = {insert_job(settings, created_at=ago(600)) for _ in range(6)}
        reports = []

        def sweep() -> None:
            reports.append(sweep_once(settings, now=NOW))

        threads = [threading.Thread(target=sweep) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        resent = [job_id for report in reports for job_id in report.resent]
        assert sorted(resent) == sorted(jobs)
        assert sorted(broker.sent_job_ids()) == sorted(str(job_id) for job_id in jobs)

    def test_a_failed_send_is_retried_by_the_next_sweep(self, settings: Settings) -> None:
        job_id = insert_job(settings, created_at=ago(600))
        down = settings.model_copy(update={"broker_url": CLOSED_PORT_BROKER})

        report = sweep_once(down, now=NOW)

        assert report.send_failures == [job_id]
        assert read_job(settings, job_id).enqueued_at is None
        assert sweep_once(settings, now=NOW + timedelta(seconds=1)).resent == [job_id]

    def test_does_not_re_send_a_job_whose_message_the_broker_still_holds(
        self, settings: Settings, broker: QueueProbe
    ) -> None:
        now = datetime.now(UTC)
        stale = now - timedelta(seconds=settings.job_requeue_after_s + 1)
        delivered, waiting, lost = (
            insert_job(settings, created_at=stale, enqueued_at=stale) for _ in range(3)
        )
        dead = now - timedelta(seconds=settings.job_heartbeat_timeout_s + 1)
        put_back = insert_job(settings, status="running", attempts=1, started_at=dead, heartbeat_at=dead)
        for job_id in (delivered, waiting, put_back):  # put_back: Celery requeued its dead worker's message
            send_job(settings, job_id, "finetune")
        with make_celery(settings).connection_for_read() as connection:
            queue = connection.SimpleQueue(broker.name)
            taken = queue.get(timeout=5)  # a worker got `delivered` and has not acknowledged it yet
            try:
                report = sweep_once(settings, now=now)
            finally:
                taken.ack()
                queue.close()

        assert taken.payload[0] == [str(delivered)]
        assert report.requeued == [put_back]
        assert report.resent == [lost]
        assert sorted(report.still_in_broker) == sorted([delivered, waiting, put_back])
        assert sorted(broker.sent_job_ids()) == sorted([str(waiting), str(put_back), str(lost)])

    def test_removes_the_training_states_of_ended_jobs_only(self, settings: Settings) -> None:
        running = insert_job(settings, status="running", attempts=1, started_at=NOW, heartbeat_at=NOW)
        queued = insert_job(settings, created_at=NOW, enqueued_at=NOW)
        failed = insert_job(settings, status="failed", attempts=3, finished_at=NOW)
        gone = uuid.uuid4()
        for job_id in (running, queued, failed, gone):
            state_path(settings, job_id).parent.mkdir(parents=True, exist_ok=True)
            state_path(settings, job_id).write_bytes(b"state")

        report = sweep_once(settings, now=NOW)

        assert report.training_states_removed == 2
        assert [state_path(settings, job_id).exists() for job_id in (running, queued, failed, gone)] == [
            True,
            True,
            False,
            False,
        ]

    def test_background_sweeper_runs_until_stopped(self, settings: Settings, broker: QueueProbe) -> None:
        job_id = insert_job(settings, created_at=datetime.now(UTC) - timedelta(hours=1))
        stop = start_background_sweeper(settings.model_copy(update={"sweep_interval_s": 0.05}))
        try:
            deadline = time.monotonic() + 30
            while read_job(settings, job_id).enqueued_at is None and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            stop()
        assert broker.sent_job_ids() == [str(job_id)]
