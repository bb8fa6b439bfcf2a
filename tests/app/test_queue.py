"""The Celery configuration and sending a job id to the gpu queue, against the real Redis."""

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from kombu.exceptions import OperationalError

from app.config import Settings
from app.db import session_scope
from app.queue import enqueue_job, make_celery
from app.tables import Job
from tests.queues import job_id_of
from tests.services import CLOSED_PORT_BROKER, GPU_QUEUE_REDIS_DB, redis_db_url


@pytest.fixture
def broker(redis_url: str) -> Iterator[redis.Redis]:
    """Overrides the shared isolated queue: these tests read the real `gpu` queue, on its own database."""
    client = redis.Redis.from_url(redis_db_url(redis_url, GPU_QUEUE_REDIS_DB))
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def settings(postgres_url: str, redis_url: str, tmp_path: Path) -> Settings:
    """Overrides the shared settings: the default `gpu` queue on that database, and time limits to check."""
    return Settings(
        database_url=postgres_url,
        broker_url=redis_db_url(redis_url, GPU_QUEUE_REDIS_DB),
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


def test_embed_jobs_go_to_the_embed_queue_and_everything_else_to_gpu(
    settings: Settings, broker: redis.Redis
) -> None:
    embed, reindex = _queued_job(settings, "embed"), _queued_job(settings, "reindex")

    enqueue_job(settings, embed, "embed")
    enqueue_job(settings, reindex, "reindex")

    assert [job_id_of(raw) for raw in broker.lrange("embed", 0, -1)] == [str(embed)]
    assert json.loads(broker.lindex("embed", 0))["headers"]["task"] == "magtune.embed"
    assert [job_id_of(raw) for raw in broker.lrange("gpu", 0, -1)] == [str(reindex)], (
        "a reindex (every face, after an activation) stays on the gpu queue"
    )


def test_worker_routes_match_the_senders(settings: Settings) -> None:
    from app.queue import queue_for, task_routes

    celery = make_celery(settings)
    celery.conf.task_routes = task_routes(settings)
    router = celery.amqp.router
    for kind in ("finetune", "evaluate", "reindex", "validate_model", "embed"):
        route = router.route({}, f"magtune.{kind}")
        assert route["queue"].name == queue_for(settings, kind), kind
    assert queue_for(settings, "embed") == "embed" and queue_for(settings, "finetune") == "gpu"


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
