"""The service commands outside the end-to-end runs: `magtune sweep`, `magtune import` with an api, help."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import select

from app.db import get_engine, session_scope
from app.tables import Job
from tests.conftest import require
from tests.e2e.services import ServiceProcess, free_port, magtune_command, service_environment
from tests.keys import issue_test_key
from tests.services import SWEEP_REDIS_DB, dedicated_redis, redis_available
from worker.cli import build_parser, service_commands


def _magtune(
    *args: str, settings: dict[str, str] | None = None, cwd: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        magtune_command(*args),
        env=service_environment(settings or {}),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


COMMANDS = {
    "up",
    "migrate",
    "serve",
    "worker",
    "sweep",
    "import",
    "reindex",
    "keys",
    "finetune",
    "evaluate",
    "validate",
    "split",
    "embed",
    "selftest",
}


def test_help_lists_the_service_commands() -> None:
    parser = build_parser()
    (commands,) = (action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    assert set(commands.choices) == COMMANDS
    listed = re.findall(r"^    (\S+) +\S", parser.format_help(), flags=re.MULTILINE)
    assert sorted(listed) == sorted(COMMANDS), "each command on its own line of the help, with what it does"


def test_worker_defaults_to_one_job_at_a_time() -> None:
    args = build_parser().parse_args(["worker"])
    assert (args.concurrency, args.queue) == (1, None)


def _write(path: Path, rows: object) -> Path:
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture
def migrated_database(postgres_database: str, tmp_path: Path) -> Iterator[str]:
    done = _magtune("migrate", settings={"MAGTUNE_DATABASE_URL": postgres_database}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    yield postgres_database
    get_engine(postgres_database).dispose()


def test_sweep_hands_back_a_job_whose_worker_went_silent(migrated_database: str, tmp_path: Path) -> None:
    require(redis_available(), "Redis not reachable (MAGTUNE_TEST_REDIS)")
    silent_since = datetime.now(UTC) - timedelta(hours=1)
    job_id = uuid.uuid4()
    with session_scope(migrated_database) as session:
        session.add(
            Job(
                id=job_id,
                kind="reindex",
                status="running",
                params={},
                attempts=1,
                max_attempts=3,
                started_at=silent_since,
                heartbeat_at=silent_since,
            )
        )
    with dedicated_redis(SWEEP_REDIS_DB) as broker:
        settings = {"MAGTUNE_DATABASE_URL": migrated_database, "MAGTUNE_BROKER_URL": broker}
        done = _magtune("sweep", settings=settings, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["requeued"] == [str(job_id)]
        assert report["counts"]["requeued"] == 1 and report["counts"]["failed"] == 0
        assert redis.Redis.from_url(broker).llen("gpu") == 1, "the job's id is on the queue again"
    with session_scope(migrated_database) as session:
        assert session.scalar(select(Job.status).where(Job.id == job_id)) == "queued"


def _png(seed: int) -> bytes:
    import io
    import random

    from PIL import Image

    pixels = random.Random(seed).randbytes(112 * 112 * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (112, 112), pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_import_skips_the_pairs_of_a_refused_image(migrated_database: str, tmp_path: Path) -> None:
    for index in range(3):
        (tmp_path / f"{index}.png").write_bytes(_png(index))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    rows = [
        {"image1": "0.png", "image2": "1.png", "label": 1},
        {"image1": "1.png", "image2": "2.png", "label": 0},
        {"image1": "0.png", "image2": "broken.png", "label": 0},
    ]
    settings = {
        "MAGTUNE_DATABASE_URL": migrated_database,
        "MAGTUNE_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
        "MAGTUNE_DATA_DIR": str(tmp_path / "data"),
    }
    port = free_port()
    with ServiceProcess(
        "api", ["serve", "--port", str(port)], service_environment(settings), tmp_path
    ) as api:
        api.wait_for_http(f"http://127.0.0.1:{port}/healthz")
        feedback = _write(tmp_path / "pairs.json", rows)
        key = issue_test_key(migrated_database, ["faces:write", "feedback:write", "feedback:read"])
        url = f"http://127.0.0.1:{port}"
        keyless = _magtune("import", str(feedback), "--api", url, "--json", cwd=tmp_path)
        done = _magtune("import", str(feedback), "--api", url, "--json", "--api-key", key, cwd=tmp_path)
        stored = httpx.get(
            f"{url}/v1/feedback", params={"split": "cross"}, headers={"Authorization": f"Bearer {key}"}
        ).json()
    assert keyless.returncode == 2 and keyless.stdout == ""
    assert "401" in keyless.stderr and "set MAGTUNE_API_KEY or pass --api-key" in keyless.stderr
    assert done.returncode == 1, "something was refused"
    result = json.loads(done.stdout)
    assert result["faces"] == {"created": 3, "existing": 0, "rejected": 1}
    assert result["pairs"] == {
        "created": 2,
        "existing": 0,
        "rejected": 0,
        "cross": len(stored["items"]),
        "same_face": 0,
        "bad_image": 1,
    }
    assert [line.split(":")[0] for line in result["rejections"]] == [
        f"image {(tmp_path / 'broken.png').resolve()}"
    ]


def test_every_command_but_the_long_running_ones_takes_json() -> None:
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    takes_json = {
        name for name, sub in commands.items() if any("--json" in a.option_strings for a in sub._actions)
    }
    assert set(commands) - takes_json == {"up", "serve", "worker", "keys"}
    keys = commands["keys"]._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert all(any("--json" in a.option_strings for a in sub._actions) for sub in keys.values())
    assert {"migrate", "sweep"} <= takes_json


def test_migrate_json_names_the_database_and_its_revision(postgres_database: str, tmp_path: Path) -> None:
    from alembic.script import ScriptDirectory

    from app.migrate import alembic_config

    settings = {"MAGTUNE_DATABASE_URL": postgres_database}
    done = _magtune("migrate", "--json", settings=settings, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    head = ScriptDirectory.from_config(alembic_config(postgres_database)).get_current_head()
    assert json.loads(done.stdout) == {"database": postgres_database, "revision": head}
    plain = _magtune("migrate", settings=settings, cwd=tmp_path)
    assert plain.stdout.strip() == f"database {postgres_database} is up to date (revision {head})"


def test_up_refuses_a_busy_port_at_once_and_starts_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        done = _magtune("up", "--port", str(port), "--data-dir", str(data_dir), cwd=tmp_path)
        elapsed = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    assert elapsed < 8, f"a busy port took {elapsed:.1f} s to refuse"
    assert done.stderr.count("\n") == 1 and f"127.0.0.1:{port}" in done.stderr
    assert "Address already in use" in done.stderr
    assert "celery" not in (done.stdout + done.stderr).lower(), "no worker was started"
    assert not data_dir.exists(), "nothing was migrated, no broker database created"


def test_up_prints_where_everything_is_last_once_every_process_is_ready(tmp_path: Path) -> None:
    port, data_dir = free_port(), tmp_path / "data"
    api_url = f"http://127.0.0.1:{port}"
    args = ["up", "--port", str(port), "--data-dir", str(data_dir)]
    with ServiceProcess("up", args, service_environment({}), tmp_path) as up:
        up.wait_for_log(r"\n  saved in: +\S+", timeout_s=120)
        time.sleep(2.0)  # anything either child printed after the summary would show now
        tail = [line for line in up.log_text().splitlines() if line.strip()][-7:]
        docs = httpx.get(f"{api_url}/docs", timeout=10.0)
        assert up.stop(signal.SIGINT, timeout_s=60) == 0
    assert tail[0] == (
        f"magtune api listening on {api_url}; the gpu and embed workers are ready; Ctrl-C stops all"
    )
    assert [line.split()[:2] for line in tail[1:]] == [
        ["docs:", f"{api_url}/docs"],
        ["data:", str(data_dir.resolve())],
        ["database:", f"sqlite:///{data_dir.resolve() / 'magtune.db'}"],
        ["broker:", f"sqla+sqlite:///{data_dir.resolve() / 'broker.db'}"],
        ["api", "key:"],
        ["saved", "in:"],
    ]
    key = (data_dir / "admin-key").read_text().strip()
    assert tail[5].split()[2] == key and tail[6].split()[2] == str((data_dir / "admin-key").resolve())
    log = up.log_text()
    assert re.search(r"celery@\S+ ready\.", log), "the gpu worker's own log is relayed"
    assert re.search(r"embed@\S+ ready\.", log), "the embed worker's own log is relayed"
    assert re.search(r"\.> embed +exchange=embed", log), "the embed worker consumes the embed queue"
    assert docs.status_code == 200


def test_serve_runs_blas_single_threaded_before_numpy_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Concurrent requests are the api's parallelism; a threaded BLAS under them collapses search rates."""
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    seen: dict[str, str | None] = {}
    monkeypatch.setattr(
        service_commands,
        "serve_app",
        lambda *_args, **_kw: seen.update(blas=os.environ.get("OPENBLAS_NUM_THREADS")),
    )

    assert (
        service_commands.run_serve(argparse.Namespace(host="127.0.0.1", port=1, log_level="info", workers=1))
        == 0
    )

    assert seen == {"blas": "1"}
    probe = "import sys, worker.cli, worker.cli.service_commands; print('numpy' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "False", "numpy must load after serve sets its thread count"
