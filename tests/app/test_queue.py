"""The Celery configuration and sending a job id to the gpu queue, against the real Redis."""

import base64
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from kombu.exceptions import OperationalError

from app.config import Settings
from app.db import session_scope
from app.queue import enqueue_job, make_celery
from app.tables import Job

# A database number of its own (flushed), since these tests look at the real `gpu` queue.
BROKER_DB = int(os.environ.get("MAGTUNE_TEST_QUEUE_REDIS_DB", "13"))
# Other api tests share one database and isolate themselves by queue name instead.
SHARED_BROKER_DB = int(os.environ.get("MAGTUNE_TEST_API_REDIS_DB", "14"))
CLOSED_PORT_BROKER = "redis://127.0.0.1:1/0"


def redis_db_url(redis_url: str, db: int) -> str:
    return f"{redis_url.rsplit('/', 1)[0]}/{db}"


@dataclass
class QueueProbe:
    """A queue no worker listens to, so a test can read back exactly the messages it caused."""

    client: redis.Redis
    url: str
    name: str

    def sent_job_ids(self) -> list[str]:
        return [job_id_of(raw) for raw in self.client.lrange(self.name, 0, -1)]

    def clear(self) -> None:
        self.client.delete(self.name, f"_kombu.binding.{self.name}", f"_kombu.binding_permanent.{self.name}")


def job_id_of(raw_message: bytes) -> str:
    args, _kwargs, _embed = json.loads(base64.b64decode(json.loads(raw_message)["body"]))
    return args[0]


@contextmanager
def isolated_queue(redis_url: str) -> Iterator[QueueProbe]:
    url = redis_db_url(redis_url, SHARED_BROKER_DB)
    queue = QueueProbe(redis.Redis.from_url(url), url, f"gpu-test-{uuid.uuid4().hex[:12]}")
    try:
        yield queue
    finally:
        queue.clear()


@pytest.fixture
def broker(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_db_url(redis_url, BROKER_DB))
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def settings(postgres_url: str, redis_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=postgres_url,
        broker_url=redis_db_url(redis_url, BROKER_DB),
        data_dir=tmp_path / "data",
        job_soft_time_limit_s=7200,
        job_time_limit_s=7500,
    )


def _queued_job(settings: Settings, kind: str = "finetune") -> uuid.UUID:
    with session_scope(settings.database_url) as session:
        job = Job(kind=kind, params={}, max_attempts=3)
        session.add(job)
        session.flush()
        return job.id


def test_celery_config_suits_long_gpu_jobs(settings: Settings) -> None:
    conf = make_celery(settings).conf
    assert conf.broker_url == settings.broker_url
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_max_tasks_per_child == 1
    assert conf.task_default_queue == "gpu"
    assert conf.task_ignore_result is True
    assert conf.task_soft_time_limit == 7200
    assert conf.task_time_limit == 7500
    visibility = conf.broker_transport_options["visibility_timeout"]
    assert visibility == settings.visibility_timeout_s
    assert visibility > conf.task_time_limit


def test_enqueue_job_sends_the_id_to_the_gpu_queue(settings: Settings, broker: redis.Redis) -> None:
    job_id = _queued_job(settings, "evaluate")

    enqueue_job(settings, job_id, "evaluate")

    assert broker.llen("gpu") == 1
    message = json.loads(broker.lindex("gpu", 0))
    assert message["headers"]["task"] == "magtune.evaluate"
    assert job_id_of(broker.lindex("gpu", 0)) == str(job_id)
    with session_scope(settings.database_url) as session:
        assert session.get(Job, job_id).enqueued_at is not None


def test_enqueue_job_raises_and_leaves_the_row_unsent_when_the_broker_is_down(
    settings: Settings, broker: redis.Redis
) -> None:
    job_id = _queued_job(settings)
    down = settings.model_copy(update={"broker_url": CLOSED_PORT_BROKER})

    with pytest.raises(OperationalError):
        enqueue_job(down, job_id, "finetune")

    with session_scope(settings.database_url) as session:
        assert session.get(Job, job_id).enqueued_at is None
    assert broker.llen("gpu") == 0
