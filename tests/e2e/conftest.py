"""End-to-end fixtures: the api and worker as real processes, started with `magtune serve` / `magtune worker`.

Every test gets a fresh PostgreSQL database (migrated with `magtune migrate`), a Redis database number of its
own (flushed), a temporary data directory, and short heartbeat and sweep intervals so lost workers are
noticed within seconds. The processes' logs are attached to the report of a failing test.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import require
from tests.e2e.services import (
    FRONTEND_SCOPES,
    OPERATOR_SCOPES,
    RunningApi,
    ServiceProcess,
    client_with_key,
    free_port,
    magtune_command,
    printed_admin_key,
    service_environment,
)
from tests.keys import issue_test_key
from tests.services import E2E_REDIS_DB, dedicated_redis, redis_available

pytest.register_assert_rewrite("tests.e2e.flow")

WORKER_READY = r"celery@\S+ ready"
EMBED_WORKER_READY = r"embed@\S+ ready"
SERVICES = pytest.StashKey[list[ServiceProcess]]()

Launch = Callable[[str, list[str], dict[str, str]], ServiceProcess]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for service in item.stash.get(SERVICES, []):
            report.sections.append((f"service {service.name}", service.describe()))


@pytest.fixture
def redis_broker() -> Iterator[str]:
    require(redis_available(), "Redis not reachable (MAGTUNE_TEST_REDIS)")
    with dedicated_redis(E2E_REDIS_DB) as url:
        yield url


@pytest.fixture
def heartbeat_timeout_s() -> float:
    """How long a silent worker is trusted; a test that kills workers overrides this with a shorter one."""
    return 30.0


def quick_timing(heartbeat_timeout_s: float = 30.0) -> dict[str, str]:
    """Heartbeats and sweeps every second, so lost workers are noticed within seconds."""
    return {
        "MAGTUNE_JOB_HEARTBEAT_INTERVAL_S": "1",
        "MAGTUNE_JOB_HEARTBEAT_TIMEOUT_S": str(heartbeat_timeout_s),
        "MAGTUNE_SWEEP_INTERVAL_S": "1",
    }


@pytest.fixture
def timing_settings(heartbeat_timeout_s: float) -> dict[str, str]:
    return quick_timing(heartbeat_timeout_s)


@pytest.fixture
def service_settings(
    tmp_path: Path, postgres_database: str, redis_broker: str, timing_settings: dict[str, str]
) -> dict[str, str]:
    """The MAGTUNE_* environment of the api and the worker, after `magtune migrate` has run with it."""
    settings = {
        "MAGTUNE_DATABASE_URL": postgres_database,
        "MAGTUNE_BROKER_URL": redis_broker,
        "MAGTUNE_DATA_DIR": str(tmp_path / "data"),
        **timing_settings,
    }
    return migrated(settings, tmp_path)


def migrated(settings: dict[str, str], workdir: Path) -> dict[str, str]:
    """`settings`, once `magtune migrate` has brought their database to the latest schema."""
    migrate = subprocess.run(
        magtune_command("migrate"),
        env=service_environment(settings),
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert migrate.returncode == 0, f"magtune migrate failed:\n{migrate.stdout}\n{migrate.stderr}"
    return settings


class Launcher:
    """Starts `magtune` processes with their logs under one folder, and stops them all (newest first)."""

    def __init__(self, workdir: Path, *, stop_timeout_s: float = 15.0) -> None:
        self.workdir = workdir
        self.stop_timeout_s = stop_timeout_s
        self.started: list[ServiceProcess] = []

    def __call__(self, name: str, args: list[str], settings: dict[str, str]) -> ServiceProcess:
        service = ServiceProcess(name, args, service_environment(settings), self.workdir)
        self.started.append(service)
        return service.start()

    def stop_all(self) -> None:
        for service in reversed(self.started):
            service.stop(timeout_s=self.stop_timeout_s)


@pytest.fixture
def launch(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Launch]:
    """Start `magtune` processes for this test; all of them are stopped afterwards, whatever happened."""
    launcher = Launcher(tmp_path / "services")
    request.node.stash[SERVICES] = launcher.started
    try:
        yield launcher
    finally:
        launcher.stop_all()


def start_api(launch: Launch, settings: dict[str, str]) -> RunningApi:
    port = free_port()
    process = launch("api", ["serve", "--host", "127.0.0.1", "--port", str(port)], settings)
    url = f"http://127.0.0.1:{port}"
    process.wait_for_http(f"{url}/readyz")
    return RunningApi(url, process)


def start_up(launch: Launch, settings: dict[str, str], data_dir: Path) -> RunningApi:
    """Start `magtune up` (the embedded default) on a data directory and wait until its api is listening."""
    port = free_port()
    process = launch("up", ["up", "--port", str(port), "--data-dir", str(data_dir)], settings)
    url = f"http://127.0.0.1:{port}"
    process.wait_for_log(f"magtune api listening on {url}")
    return RunningApi(url, process, printed_admin_key(process.log_text()))


@pytest.fixture(name="start_up")
def start_up_fixture(launch: Launch, timing_settings: dict[str, str]) -> Callable[[Path], RunningApi]:
    """`start_up` for this test: `magtune up` on a data directory, stopped after the test."""
    return lambda data_dir: start_up(launch, timing_settings, data_dir)


# `service_settings` comes before `launch` in these signatures: fixtures are torn down in reverse order, so
# the processes stop before their database is dropped.


@pytest.fixture
def api(service_settings: dict[str, str], launch: Launch) -> RunningApi:
    return start_api(launch, service_settings)


@pytest.fixture
def start_worker(service_settings: dict[str, str], launch: Launch) -> Callable[[], ServiceProcess]:
    """Start a `magtune worker` and wait until Celery reports it ready; call again for another."""

    def start() -> ServiceProcess:
        worker = launch("worker", ["worker"], service_settings)
        worker.wait_for_log(WORKER_READY)
        return worker

    return start


@pytest.fixture
def start_embed_worker(service_settings: dict[str, str], launch: Launch) -> Callable[[], ServiceProcess]:
    """Start a `magtune worker --queue embed` (faces embedded on arrival) and wait until it is ready."""

    def start() -> ServiceProcess:
        worker = launch("embed-worker", ["worker", "--queue", "embed"], service_settings)
        worker.wait_for_log(EMBED_WORKER_READY)
        return worker

    return start


@pytest.fixture
def issue_key(service_settings: dict[str, str]) -> Callable[..., str]:
    """Issue a key with these scopes (every scope when none is named) in the services' database."""

    def issue(*scopes: str, name: str = "e2e") -> str:
        database_url = service_settings["MAGTUNE_DATABASE_URL"]
        return issue_test_key(database_url, scopes, name=name) if scopes else issue_test_key(database_url)

    return issue


@pytest.fixture
def http(api: RunningApi, issue_key: Callable[..., str]) -> Iterator[httpx.Client]:
    """A client with a key of every scope, for tests about something else than access."""
    with client_with_key(api.url, issue_key()) as client:
        yield client


@pytest.fixture
def frontend_http(api: RunningApi, issue_key: Callable[..., str]) -> Iterator[httpx.Client]:
    with client_with_key(api.url, issue_key(*FRONTEND_SCOPES, name="frontend")) as client:
        yield client


@pytest.fixture
def operator_http(api: RunningApi, issue_key: Callable[..., str]) -> Iterator[httpx.Client]:
    with client_with_key(api.url, issue_key(*OPERATOR_SCOPES, name="operator")) as client:
        yield client
