"""Reading back what was sent to the broker: job ids in the Celery messages on a queue no worker reads."""

import base64
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis

from tests.services import ISOLATED_QUEUES_REDIS_DB, redis_db_url


@dataclass
class QueueProbe:
    """A queue no worker listens to, so a test can read back exactly the messages it caused."""

    client: redis.Redis
    url: str
    name: str

    @property
    def embed_name(self) -> str:
        """This test's embed queue: `embed` jobs are routed there, beside the gpu queue."""
        return f"{self.name}-embed"

    def sent_job_ids(self, queue: str | None = None) -> list[str]:
        return [job_id_of(raw) for raw in self.client.lrange(queue or self.name, 0, -1)]

    def clear(self) -> None:
        for name in (self.name, self.embed_name):
            self.client.delete(name, f"_kombu.binding.{name}", f"_kombu.binding_permanent.{name}")


def job_id_of(raw_message: bytes) -> str:
    args, _kwargs, _embed = json.loads(base64.b64decode(json.loads(raw_message)["body"]))
    return args[0]


@contextmanager
def isolated_queue(redis_url: str) -> Iterator[QueueProbe]:
    """A queue of a random name in the shared database, so tests need not flush anything to stay apart."""
    url = redis_db_url(redis_url, ISOLATED_QUEUES_REDIS_DB)
    queue = QueueProbe(redis.Redis.from_url(url), url, f"gpu-test-{uuid.uuid4().hex[:12]}")
    try:
        yield queue
    finally:
        queue.clear()
