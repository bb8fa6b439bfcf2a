"""Which jobs the broker still holds: waiting on a queue, or delivered to a worker and not yet acknowledged.

A queued job whose message was sent long ago is not necessarily lost: with one job at a time per GPU it may
simply be waiting behind a long fine-tune. Re-sending it would put a duplicate on the queue, and each
duplicate later costs a worker process that starts only to find the job taken. So before re-sending, the
sweeper asks the broker. On Redis, kombu keeps a queue as a list of messages and a delivered, unacknowledged
message in the `unacked` hash, with its delivery time in `unacked_index`, until it is acknowledged or, after
`visibility_timeout` (hours: longer than the longest job), restored to its queue. All are read in one
transaction, so a message moving from the list to the hash is seen in one or the other. A delivery counts
only while recent: a worker claims its job the moment it gets the message, so an old delivery of a job that
is still queued belongs to a worker that died, and its message is as good as lost until restored. Other
brokers (the embedded SQLAlchemy transport) cannot be inspected this way: there the answer is "unknown" and
the sweeper re-sends as before, which the worker's claim makes safe.
"""

import base64
import binascii
import itertools
import json
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import redis

from app.config import Settings

log = logging.getLogger(__name__)

UNACKED_KEY = "unacked"  # kombu's default `unacked_key` and `unacked_index_key` for the Redis transport
UNACKED_INDEX_KEY = "unacked_index"
SOCKET_TIMEOUT_S = 3.0

_clients: dict[str, redis.Redis] = {}
_clients_lock = threading.Lock()


def _client(url: str) -> redis.Redis:
    with _clients_lock:
        if url not in _clients:
            _clients[url] = redis.Redis.from_url(
                url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=SOCKET_TIMEOUT_S
            )
        return _clients[url]


def _job_id(message: dict) -> str | None:
    """The job (or chunk) id a Celery message carries: the first argument in its body."""
    try:
        args = json.loads(base64.b64decode(message["body"]))[0]
    except (KeyError, IndexError, TypeError, ValueError, binascii.Error):
        return None
    return str(args[0]) if isinstance(args, list) and args else None


def _decoded(raw: bytes) -> dict | None:
    try:
        payload = json.loads(raw)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


@dataclass(frozen=True)
class Held:
    """Job ids in messages waiting on the queues asked about, and in messages delivered recently."""

    waiting: frozenset[str]
    delivered: frozenset[str]


def held_job_ids(settings: Settings, queues: Iterable[str], delivered_since: float) -> Held | None:
    """What the broker holds for `queues` (deliveries since the Unix time `delivered_since`); None when that
    cannot be known (not Redis, or Redis not answering)."""
    if settings.broker_url.split("://", 1)[0] not in ("redis", "rediss"):
        return None
    try:
        with _client(settings.broker_url).pipeline(transaction=True) as pipe:
            for queue in queues:
                pipe.lrange(queue, 0, -1)
            pipe.hgetall(UNACKED_KEY)
            pipe.zrangebyscore(UNACKED_INDEX_KEY, delivered_since, "+inf")
            *lists, unacked, recent = pipe.execute()
    except redis.RedisError as exc:
        log.warning("could not read the broker's queues (%s); re-sending what looks lost", exc)
        return None
    waiting = {_job_id(message) for raw in itertools.chain(*lists) if (message := _decoded(raw)) is not None}
    delivered = set()
    for tag in recent:
        entry = _decoded_entry(unacked.get(tag))
        delivered.add(_job_id(entry) if entry is not None else None)
    return Held(frozenset(waiting - {None}), frozenset(delivered - {None}))


def _decoded_entry(raw: bytes | None) -> dict | None:
    """The message of an `unacked` entry, stored as [message, exchange, routing key]."""
    try:
        entry = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    return entry[0] if isinstance(entry, list) and entry and isinstance(entry[0], dict) else None
