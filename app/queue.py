"""The Celery configuration shared by the api (which only sends) and the worker (which consumes).

Celery carries nothing but a job id; the job row in the database is the truth about a job. The settings
below are the ones long GPU jobs need: a message is acknowledged only after the task ends, one
message is reserved at a time, and Redis re-delivers an unacknowledged message only after the longest job.
"""

import logging
import threading
import uuid
from datetime import UTC, datetime

from celery import Celery
from sqlalchemy import update

from app.config import Settings
from app.db import session_scope
from app.domain import JobKind
from app.tables import Job

log = logging.getLogger(__name__)

TASK_PREFIX = "magtune."
BROKER_CONNECT_TIMEOUT_S = 3.0
# A send gives up quickly when the broker is down: the job row stays queued and the sweeper re-sends it.
SEND_RETRY_POLICY = {"max_retries": 1, "interval_start": 0.0, "interval_step": 0.5, "interval_max": 0.5}


def task_name(kind: str) -> str:
    return f"{TASK_PREFIX}{kind}"


def queue_for(settings: Settings, kind: str) -> str:
    """The queue a job kind goes to: `embed` jobs (small, frequent) to the embed queue, whose worker keeps its
    child process and loaded models; everything else to the gpu queue, a fresh child process per job."""
    return settings.embed_queue_name if kind == JobKind.EMBED else settings.queue_name


def task_routes(settings: Settings) -> dict[str, dict[str, str]]:
    """Celery's routes for the same rule, for a worker that sends tasks itself (first match wins)."""
    return {
        task_name(JobKind.EMBED): {"queue": queue_for(settings, JobKind.EMBED)},
        f"{TASK_PREFIX}*": {"queue": settings.queue_name},
    }


def uses_redis(broker_url: str) -> bool:
    return broker_url.split("://", 1)[0] in ("redis", "rediss", "sentinel")


def transport_options(settings: Settings) -> dict[str, float | int]:
    """Options for the broker's kombu transport. Redis reads `visibility_timeout` here and only here; the
    SQLAlchemy transport hands every option to `create_engine`, so it gets none. Only connecting is bounded:
    a worker's connection sits idle for as long as a job runs."""
    if not uses_redis(settings.broker_url):
        return {}
    return {
        "visibility_timeout": settings.visibility_timeout_s,
        "socket_connect_timeout": BROKER_CONNECT_TIMEOUT_S,
    }


def make_celery(settings: Settings, name: str = "magtune") -> Celery:
    celery = Celery(name, broker=settings.broker_url)
    celery.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=1,
        worker_concurrency=1,
        task_default_queue=settings.queue_name,
        task_create_missing_queues=True,
        task_soft_time_limit=settings.job_soft_time_limit_s,
        task_time_limit=settings.job_time_limit_s,
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_timeout=BROKER_CONNECT_TIMEOUT_S,
        broker_connection_retry_on_startup=True,
        # The job row guards against a second run, so a lost broker connection need not kill a long job.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_transport_options=transport_options(settings),
    )
    return celery


_senders: dict[tuple[str, str], Celery] = {}
_senders_lock = threading.Lock()


def _sender(settings: Settings) -> Celery:
    """One Celery app per broker, so its connection pool is reused across requests."""
    key = (settings.broker_url, settings.queue_name)
    with _senders_lock:
        if key not in _senders:
            _senders[key] = make_celery(settings, name="magtune-api")
        return _senders[key]


def send_job(settings: Settings, job_id: uuid.UUID, kind: str) -> None:
    """Publish the job's id as task `magtune.<kind>` on its kind's queue; raises when the broker is down.

    The one place a queue is chosen: the first send after commit and the sweeper's re-send both come here.
    """
    _sender(settings).send_task(
        task_name(kind),
        args=[str(job_id)],
        queue=queue_for(settings, kind),
        retry=True,
        retry_policy=SEND_RETRY_POLICY,
    )


def enqueue_job(settings: Settings, job_id: uuid.UUID, kind: str) -> None:
    """Send the job's id to its queue, then stamp `enqueued_at` on its row.

    Call only after the row is committed. Raises when the broker cannot be reached; the caller decides
    whether that matters (a queued row without `enqueued_at` is re-sent by the sweeper).
    """
    send_job(settings, job_id, kind)
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=datetime.now(UTC)))


def try_enqueue_job(settings: Settings, job_id: uuid.UUID, kind: str) -> bool:
    """`enqueue_job` that logs instead of raising: for callers whose job row is already safely committed."""
    try:
        enqueue_job(settings, job_id, kind)
    except Exception:
        log.warning(
            "could not send job %s (%s) to the broker; the sweeper will re-send it",
            job_id,
            kind,
            exc_info=True,
        )
        return False
    return True


CHUNK_TASK = f"{TASK_PREFIX}reindex_chunk"


def send_chunk(settings: Settings, chunk_id: uuid.UUID) -> None:
    """Publish a chunk of a sharded reindex on the gpu queue (its job's); raises when the broker is down.

    A lost chunk message costs time, not work: the job's own worker takes queued chunks from the database.
    """
    _sender(settings).send_task(
        CHUNK_TASK,
        args=[str(chunk_id)],
        queue=queue_for(settings, JobKind.REINDEX),
        retry=True,
        retry_policy=SEND_RETRY_POLICY,
    )
