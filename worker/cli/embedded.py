"""`magtune up`: the whole service on one machine, as a migration and two supervised child processes.

The api and the worker run as `magtune serve` and `magtune worker` children, each in a process group of its
own: Ctrl-C in a terminal reaches only this supervisor, which then stops each child exactly once (SIGTERM:
uvicorn drains requests, Celery finishes or hands back its job), so Celery never sees the second signal that
would make it abandon a job. When either child dies, the other is stopped and `up` exits non-zero.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from worker.cli.output import EXIT_FAILED, EXIT_OK

POLL_S = 0.2
READY_TIMEOUT_S = 120.0
_PR_SET_PDEATHSIG = 1


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]

    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signum)

    def kill_group(self) -> None:
        """SIGKILL the child and whatever it started (Celery's pool processes)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)


class StopRequest:
    """Turns SIGINT/SIGTERM/SIGHUP into a request: the first asks for a clean stop, the second for a kill."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.forced = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.requested.is_set():
            self.forced.set()
        self.requested.set()


def run_embedded(*, host: str, port: int, data_dir: str | None, stop_timeout_s: float) -> int:
    if data_dir is not None:
        os.environ["MAGTUNE_DATA_DIR"] = str(Path(data_dir).resolve())
    where = _prepare_database()
    stop = StopRequest()
    children = [
        _spawn("api", ["serve", "--host", host, "--port", str(port)]),
        _spawn("worker", ["worker"]),
    ]
    try:
        failed = _supervise(children, stop, api_url=f"http://{_client_host(host)}:{port}", where=where)
    finally:
        _stop_all(children, stop, stop_timeout_s)
    return EXIT_FAILED if failed else EXIT_OK


def _prepare_database() -> str:
    """Migrate before anything serves; returns a line saying where the data lives."""
    from sqlalchemy.engine import make_url

    from app.config import Settings
    from app.migrate import upgrade_database

    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # The children resolve the data directory exactly as this process did, whatever their working directory.
    os.environ["MAGTUNE_DATA_DIR"] = str(settings.data_dir.resolve())
    upgrade_database(settings.database_url)
    database = make_url(settings.database_url).render_as_string(hide_password=True)
    return f"data {settings.data_dir.resolve()}, database {database}"


def _child_setup() -> None:
    """In the child before exec: die with the supervisor, even when it is SIGKILLed."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _spawn(name: str, command: list[str]) -> Child:
    process = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", *command],
        process_group=0,
        preexec_fn=_child_setup,
    )
    return Child(name, process)


def _supervise(children: list[Child], stop: StopRequest, *, api_url: str, where: str) -> bool:
    """Wait for a stop request or a child's death; True when a child died on its own."""
    announced = False
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not stop.requested.is_set():
        for child in children:
            if not child.alive():
                _report(f"{child.name} exited with status {child.process.returncode}; stopping")
                return True
        if not announced and _answers(f"{api_url}/healthz"):
            print(f"magtune api listening on {api_url} ({where}); Ctrl-C stops", flush=True)
            announced = True
        elif not announced and time.monotonic() > deadline:
            _report(f"the api did not answer on {api_url} within {READY_TIMEOUT_S:.0f} s; stopping")
            return True
        stop.requested.wait(POLL_S)
    return False


def _stop_all(children: list[Child], stop: StopRequest, timeout_s: float) -> None:
    for child in children:
        child.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while any(child.alive() for child in children) and time.monotonic() < deadline:
        if stop.forced.wait(POLL_S):
            break
    for child in children:
        if child.alive():
            _report(f"{child.name} did not stop in time; killing it")
        child.kill_group()
        child.process.wait()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _client_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(host, host)


def _report(message: str) -> None:
    print(f"magtune up: {message}", file=sys.stderr, flush=True)
