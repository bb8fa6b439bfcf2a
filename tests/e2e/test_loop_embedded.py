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

from tests.e2e.flow import run_feedback_loop, seed_with_import_command
from tests.e2e.services import RunningApi, session_members, wait_for_session_end

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

    with httpx.Client(base_url=started.url, timeout=60.0) as http:
        assert http.get("/readyz").status_code == 200
        seeded = seed_with_import_command(http, johns_dir, tmp_path)
        outcome = run_feedback_loop(http, seeded, mobilefacenet_checkpoint)
    print(json.dumps({"promoted": outcome["promoted"], "polls": outcome["polls"], "gate": outcome["gate"]}))

    assert "Traceback" not in up.log_text(), "the api or the worker logged an error on the happy path"
    assert (data_dir / "magtune.db").is_file() and (data_dir / "broker.db").is_file()
    assert any((data_dir / "blobs" / "checkpoints").rglob("*")), "checkpoints live in the data directory"
    assert up.stop(signal.SIGINT, timeout_s=60) == 0, "Ctrl-C stops the api and the worker cleanly"
    assert wait_for_session_end(up.pid) == [], "nothing `up` started outlives it"


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
