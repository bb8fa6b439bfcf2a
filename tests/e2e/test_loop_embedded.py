"""The whole loop on the embedded default: `magtune up` with a data directory, nothing else installed.

SQLite holds the data and, through Celery's SQLAlchemy transport, the queue; `up` runs the api and one
worker. Faces and feedback arrive through `magtune import`, the way an operator brings the seed's files.
"""

import contextlib
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.e2e.flow import ok, run_feedback_loop, seed_with_import_command
from tests.e2e.services import (
    FRONTEND_SCOPES,
    OPERATOR_SCOPES,
    RunningApi,
    client_with_key,
    session_members,
    wait_for_session_end,
)

pytestmark = pytest.mark.slow


def test_feedback_loop_on_the_embedded_default(
    start_up: Callable[[Path], RunningApi],
    tmp_path: Path,
    johns_dir: Path,
    mobilefacenet_checkpoint: Path,
) -> None:
    data_dir = tmp_path / "data"
    started = start_up(data_dir)
    up = started.process
    assert started.admin_key is not None, "the first start prints the admin key"

    with client_with_key(started.url, started.admin_key) as admin:
        frontend_key = _new_key(admin, "frontend", FRONTEND_SCOPES)
        operator_key = _new_key(admin, "operator", OPERATOR_SCOPES)
    with (
        client_with_key(started.url, frontend_key) as frontend,
        client_with_key(started.url, operator_key) as ops,
    ):
        assert httpx.get(f"{started.url}/readyz").status_code == 200
        seeded = seed_with_import_command(frontend, johns_dir, tmp_path)
        outcome = run_feedback_loop(ops, seeded, mobilefacenet_checkpoint)
    print(json.dumps({"promoted": outcome["promoted"], "polls": outcome["polls"], "gate": outcome["gate"]}))

    assert "Traceback" not in up.log_text(), "the api or the worker logged an error on the happy path"
    assert (data_dir / "magtune.db").is_file() and (data_dir / "broker.db").is_file()
    assert any((data_dir / "blobs" / "checkpoints").rglob("*")), "checkpoints live in the data directory"
    assert up.stop(signal.SIGINT, timeout_s=60) == 0, "Ctrl-C stops the api and the worker cleanly"
    assert wait_for_session_end(up.pid) == [], "nothing `up` started outlives it"


def _new_key(admin: httpx.Client, name: str, scopes: tuple[str, ...]) -> str:
    return str(ok(admin.post("/v1/keys", json={"name": name, "scopes": list(scopes)}), 201)["key"])


def test_up_creates_its_admin_key_once_and_keeps_it_private(
    start_up: Callable[[Path], RunningApi], tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    first = start_up(data_dir)
    key_file = data_dir / "admin-key"

    assert first.admin_key is not None
    assert key_file.read_text().strip() == first.admin_key
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert str(key_file.resolve()) in first.process.log_text()
    with client_with_key(first.url, first.admin_key) as admin:
        assert admin.get("/v1/keys").status_code == 200
    assert httpx.get(f"{first.url}/v1/keys").status_code == 401
    assert first.process.stop(signal.SIGINT, timeout_s=60) == 0

    second = start_up(data_dir)

    assert second.admin_key is None, "a later start prints no key"
    assert first.admin_key not in second.process.log_text()
    assert f"the admin key in {key_file.resolve()}" in second.process.log_text()
    with client_with_key(second.url, first.admin_key) as admin:
        keys = ok(admin.get("/v1/keys"), 200)["items"]
    assert [key["name"] for key in keys] == ["admin (magtune up)"]


def test_up_exits_non_zero_when_a_child_dies(start_up: Callable[[Path], RunningApi], tmp_path: Path) -> None:
    up = start_up(tmp_path / "data").process
    workers = [pid for pid in session_members(up.pid) if b"worker" in _arguments(pid)]
    assert workers, "up runs a worker"
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    up.wait_until(lambda: not up.alive(), what="exiting after its worker died", timeout_s=60)
    assert up.process is not None and up.process.returncode != 0
    assert "worker exited" in up.log_text()
    assert wait_for_session_end(up.pid) == [], "the api was stopped too"


def _arguments(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []
