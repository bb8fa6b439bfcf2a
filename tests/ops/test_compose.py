"""The production set-up: docker-compose.yml and the Dockerfile read as data, and each service's command run
outside Docker against the local PostgreSQL and Redis, exactly as the compose file spells it."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
import yaml

from tests.conftest import REPO_ROOT, require
from tests.e2e.services import ServiceProcess, free_port, magtune_command, service_environment
from tests.services import CLOSED_PORT_BROKER, COMPOSE_REDIS_DB, dedicated_redis, redis_available

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
MAGTUNE_SERVICES = ("migrate", "api", "worker", "embed-worker")
WORKERS = ("worker", "embed-worker")
TABLES = {
    "faces",
    "feedback",
    "idempotency_keys",
    "jobs",
    "models",
    "evaluations",
    "embeddings",
    "activations",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


@pytest.fixture(scope="module")
def dockerfile() -> list[str]:
    """Instructions with continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _interpolate(value: str) -> str:
    """Compose's `${NAME:-default}` with nothing set: the default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return command.split() if isinstance(command, str) else list(command)


def _cli_args(service: dict[str, Any]) -> Any:
    from worker.cli import build_parser

    command = _command(service)
    assert command[0] == "magtune"
    return build_parser().parse_args(command[1:])


def _depends(service: dict[str, Any]) -> dict[str, str]:
    return {name: spec["condition"] for name, spec in service["depends_on"].items()}


def _healthcheck(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(test)


# The files as data.


def test_compose_runs_the_six_services(services: dict[str, Any]) -> None:
    assert set(services) == {"postgres", "redis", "migrate", "api", "worker", "embed-worker"}


def test_magtune_services_share_one_settings_block(compose: dict[str, Any], services: dict[str, Any]) -> None:
    shared = compose["x-magtune-env"]
    assert {"MAGTUNE_DATABASE_URL", "MAGTUNE_BROKER_URL", "MAGTUNE_DATA_DIR"} <= set(shared)
    for name in MAGTUNE_SERVICES:
        assert services[name]["environment"] == shared, name
    assert "@postgres:5432/" in shared["MAGTUNE_DATABASE_URL"]
    assert shared["MAGTUNE_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert shared["MAGTUNE_BROKER_URL"].startswith("redis://redis:6379/")
    image = {services[name]["image"] for name in MAGTUNE_SERVICES}
    assert len(image) == 1, "migrate, api and both workers run one image"


def test_database_password_is_shared_with_postgres(compose: dict[str, Any], services: dict[str, Any]) -> None:
    password = _interpolate(services["postgres"]["environment"]["POSTGRES_PASSWORD"])
    user = services["postgres"]["environment"]["POSTGRES_USER"]
    database = services["postgres"]["environment"]["POSTGRES_DB"]
    url = _interpolate(compose["x-magtune-env"]["MAGTUNE_DATABASE_URL"])
    assert url == f"postgresql+psycopg://{user}:{password}@postgres:5432/{database}"


def test_backing_services_have_healthchecks(services: dict[str, Any]) -> None:
    assert "pg_isready" in _healthcheck(services["postgres"])
    assert "redis-cli ping" in _healthcheck(services["redis"])
    assert "/readyz" in _healthcheck(services["api"])


def test_start_order_waits_for_health_and_the_migration(services: dict[str, Any]) -> None:
    assert _depends(services["migrate"]) == {"postgres": "service_healthy"}
    for name in ("api", *WORKERS):
        depends = _depends(services[name])
        assert depends["migrate"] == "service_completed_successfully", name
        assert depends["redis"] == "service_healthy", name
    assert services["migrate"]["restart"] == "no", "a one-shot migration must not restart in a loop"
    assert services["migrate"]["healthcheck"] == {"disable": True}, (
        "the image's api healthcheck is not for it"
    )


def test_commands_are_the_cli_commands(services: dict[str, Any]) -> None:
    from worker.cli import service_commands

    migrate = _cli_args(services["migrate"])
    assert migrate.handler is service_commands.run_migrate
    api = _cli_args(services["api"])
    assert api.handler is service_commands.run_serve
    assert (api.host, api.port) == ("0.0.0.0", 8000)
    worker = _cli_args(services["worker"])
    assert worker.handler is service_commands.run_worker
    assert (worker.queue, worker.concurrency) == ("gpu", 1)
    embed = _cli_args(services["embed-worker"])
    assert embed.handler is service_commands.run_worker
    assert (embed.queue, embed.concurrency) == ("embed", 1)


def test_queue_names_match_the_settings_defaults(compose: dict[str, Any]) -> None:
    from app.config import Settings

    shared = compose["x-magtune-env"]
    defaults = Settings(database_url="sqlite://", broker_url="memory://")
    assert shared["MAGTUNE_QUEUE_NAME"] == defaults.queue_name
    assert shared["MAGTUNE_EMBED_QUEUE_NAME"] == defaults.embed_queue_name


def _celery_argv(service: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The arguments the service's `magtune worker` command hands to Celery, captured instead of run."""
    from worker.celery_app import celery_app

    captured: list[str] = []
    monkeypatch.setattr(celery_app, "start", lambda argv: captured.extend(argv))
    args = _cli_args(service)
    args.handler(args)
    return captured


def _option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_gpu_worker_gets_a_fresh_child_per_job_and_the_embed_worker_keeps_its_child(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.config import get_settings

    gpu = _celery_argv(services["worker"], monkeypatch)
    assert (_option(gpu, "--queues"), _option(gpu, "--max-tasks-per-child")) == ("gpu", "1")
    assert _option(gpu, "--hostname") is None, "the gpu worker keeps Celery's node name celery@host"
    embed = _celery_argv(services["embed-worker"], monkeypatch)
    per_child = str(get_settings().embed_worker_max_tasks_per_child)
    assert (_option(embed, "--queues"), _option(embed, "--max-tasks-per-child")) == ("embed", per_child)
    assert int(per_child) > 1
    assert _option(embed, "--hostname") == "embed@%h", "the compose healthcheck pings embed@$HOSTNAME"
    for argv in (gpu, embed):
        assert (_option(argv, "--pool"), _option(argv, "--prefetch-multiplier")) == ("prefork", "1")


def test_api_port_is_published(services: dict[str, Any]) -> None:
    published = [_interpolate(str(port)) for port in services["api"]["ports"]]
    assert "8000:8000" in published


def test_workers_reserve_one_gpu(services: dict[str, Any]) -> None:
    for name in WORKERS:
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}], name
    assert "deploy" not in services["api"], "the api needs no GPU"


def test_api_and_worker_share_the_blob_store(compose: dict[str, Any], services: dict[str, Any]) -> None:
    data_dir = compose["x-magtune-env"]["MAGTUNE_DATA_DIR"]
    mounts = {name: set(services[name]["volumes"]) for name in ("api", *WORKERS)}
    shared = mounts["api"] & mounts["worker"] & mounts["embed-worker"]
    assert any(mount.endswith(f":{data_dir}") for mount in shared)
    volume = next(mount.split(":")[0] for mount in shared if mount.endswith(f":{data_dir}"))
    assert volume in compose["volumes"], "a named volume, not a host path"


def test_dockerfile_builds_a_non_root_image_with_a_healthcheck(dockerfile: list[str]) -> None:
    assert dockerfile[0] == "FROM python:3.11-slim"
    args = {
        line.split()[1].split("=")[0]: line.split("=", 1)[-1]
        for line in dockerfile
        if line.startswith("ARG ")
    }
    assert "download.pytorch.org/whl/cu" in args["TORCH_INDEX_URL"], "the default image is the GPU one"
    assert any(
        "--index-url" in line and "TORCH_INDEX_URL" in line for line in dockerfile if line.startswith("RUN ")
    )
    users = [line.split()[1] for line in dockerfile if line.startswith("USER ")]
    assert users and users[-1] not in {"root", "0"}
    assert any(line.startswith("HEALTHCHECK ") and "/healthz" in line for line in dockerfile)
    assert any(line.startswith("CMD ") and '"serve"' in line for line in dockerfile)


def test_dockerfile_data_dir_matches_compose(compose: dict[str, Any], dockerfile: list[str]) -> None:
    data_dir = compose["x-magtune-env"]["MAGTUNE_DATA_DIR"]
    assert any(f"MAGTUNE_DATA_DIR={data_dir}" in line for line in dockerfile if line.startswith("ENV "))
    assert any(f"chown magtune:magtune {data_dir}" in line for line in dockerfile)


def test_env_example_names_only_variables_the_compose_file_reads() -> None:
    compose_text = COMPOSE_FILE.read_text()
    example = (REPO_ROOT / ".env.example").read_text()
    names = re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", example, flags=re.MULTILINE)
    assert "POSTGRES_PASSWORD" in names
    for name in names:
        if not name.startswith("MAGTUNE_") or name in {"MAGTUNE_API_PORT", "MAGTUNE_IMAGE"}:
            assert "${" + name in compose_text, name


# The commands, run outside Docker.


@pytest.fixture
def redis_broker() -> Iterator[str]:
    require(redis_available(), "Redis not reachable (MAGTUNE_TEST_REDIS)")
    with dedicated_redis(COMPOSE_REDIS_DB) as url:
        yield url


def _local_settings(
    compose: dict[str, Any], database_url: str, broker_url: str, data_dir: Path
) -> dict[str, str]:
    """The compose file's shared settings, with this machine's database, broker and data directory."""
    settings = {name: _interpolate(str(value)) for name, value in compose["x-magtune-env"].items()}
    settings.update(
        MAGTUNE_DATABASE_URL=database_url, MAGTUNE_BROKER_URL=broker_url, MAGTUNE_DATA_DIR=str(data_dir)
    )
    return settings


def _run(
    service: dict[str, Any], settings: dict[str, str], workdir: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        magtune_command(*_command(service)[1:]),
        env=service_environment(settings),
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=180,
    )


def _tables(database_url: str) -> set[str]:
    url = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
    return {row[0] for row in rows}


def _migrated_settings(
    compose: dict[str, Any], database_url: str, broker_url: str, tmp_path: Path
) -> dict[str, str]:
    settings = _local_settings(compose, database_url, broker_url, tmp_path / "data")
    result = _run(compose["services"]["migrate"], settings, tmp_path)
    assert result.returncode == 0, result.stderr
    return settings


def test_migrate_command_builds_the_schema_once(
    compose: dict[str, Any], postgres_database: str, tmp_path: Path
) -> None:
    settings = _local_settings(compose, postgres_database, CLOSED_PORT_BROKER, tmp_path / "data")
    assert _tables(postgres_database) == set()
    first = _run(compose["services"]["migrate"], settings, tmp_path)
    assert first.returncode == 0, first.stderr
    tables = _tables(postgres_database)
    assert tables >= TABLES
    assert "alembic_version" in tables, "the schema is managed by Alembic"
    again = _run(compose["services"]["migrate"], settings, tmp_path)
    assert again.returncode == 0, again.stderr
    assert _tables(postgres_database) == tables


def _listen_locally(command: list[str], port: int) -> list[str]:
    args = command[1:]
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--port") + 1] = str(port)
    return args


def test_serve_command_answers_health_and_readiness(
    compose: dict[str, Any], postgres_database: str, redis_broker: str, tmp_path: Path
) -> None:
    settings = _migrated_settings(compose, postgres_database, redis_broker, tmp_path)
    port = free_port()
    args = _listen_locally(_command(compose["services"]["api"]), port)
    with ServiceProcess("api", args, service_environment(settings), tmp_path) as api:
        api.wait_for_http(f"http://127.0.0.1:{port}/healthz")
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 200
        assert not _loads_torch(api.pid), "the api must not import torch"


def test_a_key_made_with_the_compose_command_opens_the_served_api(
    compose: dict[str, Any], postgres_database: str, redis_broker: str, tmp_path: Path
) -> None:
    """The README's first key (`docker compose run --rm api magtune keys create ...`), without Docker."""
    settings = _migrated_settings(compose, postgres_database, redis_broker, tmp_path)
    keys_create = {"command": ["magtune", "keys", "create", "--name", "admin", "--scopes", "admin", "--json"]}
    created = _run(keys_create, settings, tmp_path)
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)["key"]
    port = free_port()
    args = _listen_locally(_command(compose["services"]["api"]), port)
    with ServiceProcess("api", args, service_environment(settings), tmp_path) as api:
        api.wait_for_http(f"http://127.0.0.1:{port}/healthz")
        url = f"http://127.0.0.1:{port}/v1/keys"
        assert httpx.get(url, timeout=10).status_code == 401
        answer = httpx.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert answer.status_code == 200 and [k["name"] for k in answer.json()["items"]] == ["admin"]


def test_the_compose_api_refuses_to_run_with_auth_off(compose: dict[str, Any], tmp_path: Path) -> None:
    """It listens on 0.0.0.0: auth may be off only on loopback."""
    settings = {"MAGTUNE_AUTH_DISABLED": "true", "MAGTUNE_DATA_DIR": str(tmp_path / "data")}
    done = _run(compose["services"]["api"], settings, tmp_path)
    assert done.returncode == 2
    assert "only on a loopback address" in done.stderr


def test_cors_origins_in_the_compose_file_parse_as_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.config import Settings

    monkeypatch.setenv(
        "MAGTUNE_CORS_ORIGINS", _interpolate(str(compose["x-magtune-env"]["MAGTUNE_CORS_ORIGINS"]))
    )
    assert Settings().cors_origins == []
    monkeypatch.setenv("MAGTUNE_CORS_ORIGINS", '["https://labels.example.org"]')
    assert Settings().cors_origins == ["https://labels.example.org"]


def _loads_torch(pid: int) -> bool:
    """Whether torch's shared libraries are mapped into the process, i.e. it imported torch."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "/torch/" in maps or "libtorch" in maps


def test_serve_reports_not_ready_without_the_broker(
    compose: dict[str, Any], postgres_database: str, tmp_path: Path
) -> None:
    settings = _migrated_settings(compose, postgres_database, f"redis://127.0.0.1:{free_port()}/0", tmp_path)
    port = free_port()
    args = _listen_locally(_command(compose["services"]["api"]), port)
    with ServiceProcess("api", args, service_environment(settings), tmp_path) as api:
        api.wait_for_http(f"http://127.0.0.1:{port}/healthz")
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=30).status_code == 503


@pytest.mark.slow
def test_worker_command_consumes_the_gpu_queue_from_redis(
    compose: dict[str, Any], postgres_database: str, redis_broker: str, tmp_path: Path
) -> None:
    settings = _migrated_settings(compose, postgres_database, redis_broker, tmp_path)
    args = _command(compose["services"]["worker"])[1:]
    with ServiceProcess("worker", args, service_environment(settings), tmp_path) as worker:
        host_and_db = redis_broker.split("@")[-1].removeprefix("redis://")
        worker.wait_for_log(r"Connected to redis://\S*" + re.escape(host_and_db))
        worker.wait_for_log(r"celery@\S+ ready")
        assert redis.Redis.from_url(redis_broker).exists("_kombu.binding.gpu")
        assert not _loads_torch(worker.pid), "no CUDA (nor torch) in the worker's parent process"
        assert worker.stop(signal.SIGTERM) == 0, "a warm shutdown exits cleanly"


@pytest.mark.slow
def test_embed_worker_command_consumes_the_embed_queue_and_keeps_its_child(
    compose: dict[str, Any], postgres_database: str, redis_broker: str, tmp_path: Path
) -> None:
    settings = _migrated_settings(compose, postgres_database, redis_broker, tmp_path)
    args = _command(compose["services"]["embed-worker"])[1:]
    with ServiceProcess("embed-worker", args, service_environment(settings), tmp_path) as worker:
        worker.wait_for_log(r"embed@\S+ ready")
        assert redis.Redis.from_url(redis_broker).exists("_kombu.binding.embed")
        assert not redis.Redis.from_url(redis_broker).exists("_kombu.binding.gpu"), "only the embed queue"
        assert not _loads_torch(worker.pid), "no torch in the worker's parent process"
        assert worker.stop(signal.SIGTERM) == 0, "a warm shutdown exits cleanly"
