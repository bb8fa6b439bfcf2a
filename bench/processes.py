"""What the service benchmarks share: a fresh database, the service's environment, its processes, the load.

Each process is started in a session of its own and stopped as a group (SIGTERM, then SIGKILL when it does
not end in time), so stopping it reaches everything it started: uvicorn's and Celery's children.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

POSTGRES_ADMIN_URL = os.environ.get("MAGTUNE_TEST_POSTGRES", "postgresql://root@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("MAGTUNE_TEST_REDIS", "redis://127.0.0.1:6379/0")


# Data.


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def fresh_database(prefix: str = "magtune_bench_") -> Iterator[str]:
    """A new PostgreSQL database named `prefix` + a random suffix (dropped at the end); its SQLAlchemy URL."""
    import psycopg

    name = f"{prefix}{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def libpq_url(database_url: str) -> str:
    """The SQLAlchemy URL of `fresh_database` as psycopg takes it."""
    return database_url.replace("postgresql+psycopg://", "postgresql://", 1)


# The service.


def magtune(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("magtune")
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "worker.cli", *args]


def migrated_env(database_url: str, tmp: str | Path, **settings: str) -> dict[str, str]:
    """This process's environment without any MAGTUNE_* of the developer's, plus the database, Redis, a data
    directory under `tmp` and `settings`, after `magtune migrate` has run with it."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MAGTUNE_")}
    env.update(
        MAGTUNE_DATABASE_URL=database_url,
        MAGTUNE_BROKER_URL=REDIS_URL,
        MAGTUNE_DATA_DIR=str(Path(tmp) / "data"),
        **settings,
    )
    subprocess.run(magtune("migrate"), env=env, check=True, capture_output=True)
    return env


def api_key(env: dict[str, str], scopes: str = "faces:write,feedback:write", *, name: str = "bench") -> str:
    """A key for the feedback and face posts (or `scopes`), made as an operator makes one."""
    created = subprocess.run(
        magtune("keys", "create", "--name", name, "--scopes", scopes, "--json"),
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return str(json.loads(created.stdout)["key"])


def service_env(database_url: str, tmp: str | Path, **settings: str) -> dict[str, str]:
    """`migrated_env` with queues of this run's own, so that workers of other runs on the same Redis never
    take its jobs, and unbuffered output for the logs."""
    suffix = uuid.uuid4().hex[:8]
    return migrated_env(
        database_url,
        tmp,
        MAGTUNE_QUEUE_NAME=f"gpu-bench-{suffix}",
        MAGTUNE_EMBED_QUEUE_NAME=f"embed-bench-{suffix}",
        PYTHONUNBUFFERED="1",
        **settings,
    )


@contextmanager
def process(
    command: list[str],
    env: dict[str, str],
    log: Path,
    ready: Callable[[], bool],
    *,
    start_timeout_s: float,
    stop_timeout_s: float,
) -> Iterator[subprocess.Popen[bytes]]:
    """`command` in a session of its own, its output in `log`, once `ready()` holds; stopped as a group."""
    with log.open("wb") as out:
        started = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + start_timeout_s
        while not ready():
            if started.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command} did not start:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
        yield started
    finally:
        os.killpg(started.pid, signal.SIGTERM)
        try:
            started.wait(timeout=stop_timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(started.pid, signal.SIGKILL)
            started.wait()


@contextmanager
def server(
    command: list[str], env: dict[str, str], ready_url: str, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """An HTTP server, ready once `ready_url` answers 200."""
    import httpx

    def ready() -> bool:
        try:
            return httpx.get(ready_url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    with process(command, env, log, ready, start_timeout_s=60, stop_timeout_s=15) as started:
        yield started


@contextmanager
def worker(command: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A Celery worker, ready once its log says so."""
    with process(
        command, env, log, lambda: b" ready." in log.read_bytes(), start_timeout_s=120, stop_timeout_s=30
    ) as started:
        yield started


def wait_job(client: Any, job_id: str, *, timeout_s: float, poll_s: float = 0.2) -> dict[str, Any]:
    """The job (GET /v1/jobs/{id} through `client`) once it is no longer queued or running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(poll_s)
    raise RuntimeError(f"job {job_id} did not finish in {timeout_s} s")


# The machine, and the report.


def load_averages() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(value, 2) for value in os.getloadavg()]


def uptime() -> str:
    """`uptime` as it prints it."""
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def print_report(report: dict[str, Any]) -> None:
    print(json.dumps(report, indent=2))
