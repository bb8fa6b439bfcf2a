"""`magtune up`: the whole service on one machine, as a migration and three supervised child processes.

The api and the two workers run as `magtune serve`, `magtune worker` (the gpu queue: fine-tunes, evaluations,
reindexes, validations) and `magtune worker --queue embed` (faces embedded on arrival, with the models kept
loaded) children, each in a process group of its own: Ctrl-C in a terminal reaches only this supervisor,
which then stops each child exactly once (SIGTERM: uvicorn drains requests, Celery finishes or hands back its
job), so Celery never sees the second signal that would make it abandon a job. When any child dies, the
others are stopped and `up` exits non-zero.

Start-up is in order, so that a failure stops it early and the last thing printed says where everything is:
the port is checked first (a busy port is one line and exit 2, with nothing started: no second worker joins
another instance's broker), then the database is migrated (and, on first start, the admin key created: every
scope, written to <data dir>/admin-key with mode 0600, shown once in the summary), the api started and
awaited on /readyz, then each worker started and awaited until Celery says it is ready, and only then the
summary is printed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO
from urllib.parse import urlsplit, urlunsplit

from worker.cli.output import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, error

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


@dataclass(frozen=True)
class Where:
    """Where the embedded service keeps its data, as the summary shows it (passwords hidden)."""

    data_dir: Path
    database: str
    broker: str
    embed_queue: str = "embed"
    admin_key_path: Path | None = None  # None: auth is disabled
    new_admin_key: str | None = None  # the key, when this start created it


def run_embedded(*, host: str, port: int, data_dir: str | None, stop_timeout_s: float) -> int:
    if data_dir is not None:
        os.environ["MAGTUNE_DATA_DIR"] = str(Path(data_dir).resolve())
    busy = port_unavailable(host, port)
    if busy is not None:
        error("up", busy)
        return EXIT_BAD_INPUT
    where = _prepare_database()
    stop = StopRequest()
    api_url = f"http://{_client_host(host)}:{port}"
    children: list[Child] = []
    try:
        failed = _start(children, stop, host=host, port=port, api_url=api_url, embed_queue=where.embed_queue)
        if not failed and not stop.requested.is_set():
            print(summary(api_url, where), flush=True)
            failed = _supervise(children, stop)
    finally:
        _stop_all(children, stop, stop_timeout_s)
    return EXIT_FAILED if failed else EXIT_OK


def port_unavailable(host: str, port: int) -> str | None:
    """Why the api could not listen on (host, port), or None when it can; checked before anything starts.

    Binds the way uvicorn does (SO_REUSEADDR), so a port left in TIME_WAIT counts as free and one with a
    listener does not.
    """
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except (OSError, OverflowError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        hint = " (is magtune up running already? choose another port with --port)" if _in_use(exc) else ""
        return f"cannot listen on {host}:{port}: {reason}{hint}"
    return None


def _in_use(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE


def summary(api_url: str, where: Where) -> str:
    """What `up` prints once every process is up: where to send requests and where the data lives."""
    rows = [
        ("docs", f"{api_url}/docs"),
        ("data", str(where.data_dir)),
        ("database", where.database),
        ("broker", where.broker),
    ]
    if where.admin_key_path is None:
        rows.append(("api key", "none needed: MAGTUNE_AUTH_DISABLED=true (loopback only)"))
    elif where.new_admin_key is not None:
        rows.append(("api key", f"{where.new_admin_key} (admin, every scope; shown this once)"))
        rows.append(("saved in", f"{where.admin_key_path} (mode 0600)"))
    else:
        rows.append(("api key", f"the admin key in {where.admin_key_path} (created on first start)"))
    lines = [f"magtune api listening on {api_url}; the gpu and embed workers are ready; Ctrl-C stops all"]
    lines += [f"  {name + ':':<10}{value}" for name, value in rows]
    return "\n".join(lines)


def redacted(url: str) -> str:
    """A URL as it may be printed: any password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def _prepare_database() -> Where:
    """Migrate before anything serves; returns where the data lives."""
    from app.auth.startup import ensure_admin_key
    from app.config import Settings
    from app.migrate import upgrade_database

    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # The children resolve the data directory exactly as this process did, whatever their working directory.
    os.environ["MAGTUNE_DATA_DIR"] = str(settings.data_dir.resolve())
    upgrade_database(settings.database_url)
    admin = None if settings.auth_disabled else ensure_admin_key(settings)
    return Where(
        settings.data_dir.resolve(),
        redacted(settings.database_url),
        redacted(settings.broker_url),
        settings.embed_queue_name,
        admin.path.resolve() if admin is not None else None,
        admin.secret if admin is not None else None,
    )


def _child_setup() -> None:
    """In the child before exec: die with the supervisor, even when it is SIGKILLed."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _spawn(name: str, command: list[str], *, piped: bool = False) -> Child:
    process = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", *command],
        process_group=0,
        preexec_fn=_child_setup,
        stdout=subprocess.PIPE if piped else None,
        stderr=subprocess.STDOUT if piped else None,
        env={**os.environ, "PYTHONUNBUFFERED": "1"} if piped else None,
    )
    return Child(name, process)


def _relay(stream: IO[bytes], ready: threading.Event) -> None:
    """Copy a worker's output to our stderr line by line; set `ready` at Celery's "NODE@HOST ready."."""
    for line in iter(stream.readline, b""):
        # Keep draining when our stderr is gone (a closed pipe): a full pipe would block the worker's logging.
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.buffer.write(line)
            sys.stderr.buffer.flush()
        if b"@" in line and line.rstrip().endswith(b" ready."):
            ready.set()  # after the line is out, so the summary printed on it comes after it


def _start(
    children: list[Child], stop: StopRequest, *, host: str, port: int, api_url: str, embed_queue: str
) -> bool:
    """The api, then the gpu worker, then the embed worker, each awaited; True when one died or did not get
    ready in time."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    children.append(_spawn("api", ["serve", "--host", host, "--port", str(port)]))
    if _await(children, stop, deadline, lambda: _answers(f"{api_url}/readyz"), f"the api on {api_url}"):
        return True
    for name, command in (("worker", ["worker"]), ("embed worker", ["worker", "--queue", embed_queue])):
        if stop.requested.is_set():
            return False
        worker = _spawn(name, command, piped=True)
        children.append(worker)
        ready = threading.Event()
        assert worker.process.stdout is not None
        threading.Thread(target=_relay, args=(worker.process.stdout, ready), daemon=True).start()
        if _await(children, stop, deadline, ready.is_set, f"the {name}"):
            return True
    return False


def _await(
    children: list[Child], stop: StopRequest, deadline: float, ready: Callable[[], bool], what: str
) -> bool:
    """Poll `ready` until it holds or a stop is requested; True when a child died or time ran out."""
    while not stop.requested.is_set():
        if _died(children):
            return True
        if ready():
            return False
        if time.monotonic() > deadline:
            _report(f"{what} was not ready within {READY_TIMEOUT_S:.0f} s; stopping")
            return True
        stop.requested.wait(POLL_S)
    return False


def _died(children: list[Child]) -> bool:
    for child in children:
        if not child.alive():
            _report(f"{child.name} exited with status {child.process.returncode}; stopping")
            return True
    return False


def _supervise(children: list[Child], stop: StopRequest) -> bool:
    """Wait for a stop request or a child's death; True when a child died on its own."""
    while not stop.requested.is_set():
        if _died(children):
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
