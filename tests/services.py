"""Reaching the real PostgreSQL and Redis the tests run against, and which Redis database each suite owns.

MAGTUNE_TEST_POSTGRES names a server role that may create databases; MAGTUNE_TEST_REDIS names the Redis server
(any database number in it is replaced by the suite's own, below).
"""

import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import redis

from app.migrate import upgrade_database

POSTGRES_ADMIN_URL = os.environ.get("MAGTUNE_TEST_POSTGRES", "postgresql://root@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("MAGTUNE_TEST_REDIS", "redis://127.0.0.1:6379/0")
CLOSED_PORT_BROKER = "redis://127.0.0.1:1/0"


# Under pytest-xdist (`-n 2`) each worker is a test session of its own, with its own PostgreSQL database; its
# Redis databases move down by REDIS_DBS_PER_WORKER per worker (gw0: 10-14, gw1: 5-9, gw2: 0-4), so that one
# worker's flush never reaches the other's processes.
REDIS_DBS_PER_WORKER = 5
MAX_XDIST_WORKERS = 3
_XDIST_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
if _XDIST_WORKER >= MAX_XDIST_WORKERS:
    raise RuntimeError(
        f"the tests run on at most {MAX_XDIST_WORKERS} xdist workers (Redis has 16 databases): use -n 2"
    )


def _redis_db(variable: str, default: int) -> int:
    return int(os.environ.get(variable, str(default))) - REDIS_DBS_PER_WORKER * _XDIST_WORKER


# Redis database numbers, one per suite or purpose, so that one suite's flush or stray message never reaches
# another's (two runs of the same suite at once still share theirs). Each moves with its environment variable.
#   ISOLATED_QUEUES_REDIS_DB  tests/app, tests/worker: a throw-away queue per test (`broker`), never flushed
#   GPU_QUEUE_REDIS_DB        tests/app/test_queue.py: the real `gpu` queue, flushed around each test
#   E2E_REDIS_DB              tests/e2e: the api and real worker processes, flushed around each test
#   COMPOSE_REDIS_DB          tests/ops/test_compose.py: the compose file's commands, flushed around each test
#   SWEEP_REDIS_DB            tests/ops/test_service_commands.py: `magtune sweep`, flushed around its test
ISOLATED_QUEUES_REDIS_DB = _redis_db("MAGTUNE_TEST_API_REDIS_DB", 14)
GPU_QUEUE_REDIS_DB = _redis_db("MAGTUNE_TEST_QUEUE_REDIS_DB", 13)
E2E_REDIS_DB = _redis_db("MAGTUNE_TEST_E2E_REDIS_DB", 11)
COMPOSE_REDIS_DB = _redis_db("MAGTUNE_TEST_OPS_REDIS_DB", 12)
SWEEP_REDIS_DB = _redis_db("MAGTUNE_TEST_SWEEP_REDIS_DB", 10)

_REDIS_DBS = (ISOLATED_QUEUES_REDIS_DB, GPU_QUEUE_REDIS_DB, E2E_REDIS_DB, COMPOSE_REDIS_DB, SWEEP_REDIS_DB)
if min(_REDIS_DBS) < 0:
    raise ValueError(f"Redis database numbers must not be negative, got {_REDIS_DBS}")
if len(set(_REDIS_DBS)) != len(_REDIS_DBS):
    raise ValueError(f"each test suite needs a Redis database of its own, got {_REDIS_DBS}")


def postgres_available() -> bool:
    try:
        with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


def redis_available() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping())
    except redis.RedisError:
        return False


def redis_db_url(url: str, db: int) -> str:
    """`url` with its database number (if any) replaced by `db`."""
    return re.sub(r"/\d*$", "", url.rstrip("/")) + f"/{db}"


@contextmanager
def fresh_postgres_database(*, migrated: bool = False) -> Iterator[str]:
    """A database of its own (SQLAlchemy URL), empty or `migrated` to the latest schema, dropped afterwards
    whatever happened."""
    name = f"magtune_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    url = f"{base}/{name}"
    try:
        if migrated:
            upgrade_database(url)
        yield url
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def dedicated_redis(db: int) -> Iterator[str]:
    """A Redis database number of its own, flushed before and after, so no other test's worker reads it."""
    url = redis_db_url(REDIS_URL, db)
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()
