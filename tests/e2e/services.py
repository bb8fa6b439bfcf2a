"""Real service processes for tests, started with the project's own `magtune` commands and always stopped.

Each process leads a session of its own, so stopping it reaches everything it started: Celery's pool
children, and the api and worker that `magtune up` starts in process groups of their own. The databases
and Redis they run against come from tests/services.py.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import httpx

LOG_TAIL_CHARS = 20_000


@dataclass
class RunningApi:
    url: str
    process: ServiceProcess
    admin_key: str | None = None  # the key `magtune up` printed on its first start


# The narrowest keys that suffice for the two users of the api: a frontend that uploads faces and posts
# feedback (and reads the faces back), and an operator who registers models, runs jobs and reads metrics.
FRONTEND_SCOPES = ("faces:read", "faces:write", "feedback:write")
OPERATOR_SCOPES = (
    "jobs:read",
    "jobs:write",
    "models:read",
    "models:write",
    "models:activate",
    "metrics:read",
)
ADMIN_KEY_LINE = r"api key:\s+(mt_[0-9a-f]{16}_[A-Za-z0-9_-]{43})"


def printed_admin_key(log: str) -> str | None:
    match = re.search(ADMIN_KEY_LINE, log)
    return match.group(1) if match else None


def client_with_key(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=60.0, headers={"Authorization": f"Bearer {key}"})


class ServiceFailed(AssertionError):
    """A process died or never became ready; the message carries its log."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def magtune_command(*args: str) -> list[str]:
    """The installed `magtune` script beside this interpreter, else the same entry point via `-m`."""
    script = Path(sys.executable).with_name("magtune")
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "worker.cli", *args]


def service_environment(settings: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without any MAGTUNE_* of the developer's, plus `settings`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MAGTUNE_")}
    env.update(settings)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def session_members(session_id: int) -> list[int]:
    """Processes (Linux) whose session is `session_id`: a process started with a session of its own and all
    its descendants that did not leave it."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[3]) == session_id and fields[0] not in ("Z", "X"):  # zombies are gone already
            members.append(int(entry.name))
    return members


def wait_for_session_end(session_id: int, timeout_s: float = 15.0) -> list[int]:
    """The session's processes still alive after up to `timeout_s` (a process can take a moment to die)."""
    deadline = time.monotonic() + timeout_s
    while (members := session_members(session_id)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return members


def kill_session(session_id: int) -> None:
    """SIGKILL every process of a session (Linux); falls back to its process group elsewhere."""
    if not Path("/proc/self/stat").exists():
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(session_id, signal.SIGKILL)
        return
    for pid in session_members(session_id):
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


class ServiceProcess:
    """One `magtune` process with its log in a file; usable as a context manager that always stops it."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str], workdir: Path) -> None:
        self.name = name
        self.command = magtune_command(*args)
        self.env = dict(env)
        self.workdir = workdir
        self.log_path = workdir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def __enter__(self) -> ServiceProcess:
        return self.start() if self.process is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        if exc_type is not None and not isinstance(exc, ServiceFailed):
            print(self.describe())

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} was never started"
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def describe(self) -> str:
        status = (
            "running" if self.alive() else f"exit status {self.process.returncode if self.process else None}"
        )
        text = self.log_text()
        tail = text[-LOG_TAIL_CHARS:]
        cut = f"[... {len(text) - len(tail)} characters before]\n" if len(tail) < len(text) else ""
        return f"===== {self.name} ({' '.join(self.command[1:])}; {status}) log =====\n{cut}{tail}"

    def fail(self, why: str) -> ServiceFailed:
        return ServiceFailed(f"{self.name}: {why}\n{self.describe()}")

    def wait_until(self, ready: Callable[[], bool], *, what: str, timeout_s: float = 90.0) -> None:
        """Poll `ready` until it holds; ServiceFailed (with the log) when the process dies or time is up."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                return
            if not self.alive():
                raise self.fail(f"exited before {what}")
            time.sleep(0.2)
        raise self.fail(f"not {what} after {timeout_s:.0f} s")

    def wait_for_log(self, pattern: str, *, timeout_s: float = 90.0) -> None:
        regex = re.compile(pattern)
        self.wait_until(
            lambda: regex.search(self.log_text()) is not None,
            what=f"logging /{pattern}/",
            timeout_s=timeout_s,
        )

    def wait_for_http(self, url: str, *, timeout_s: float = 90.0) -> None:
        def answers() -> bool:
            try:
                return httpx.get(url, timeout=2.0).status_code == 200
            except httpx.HTTPError:
                return False

        self.wait_until(answers, what=f"answering 200 on {url}", timeout_s=timeout_s)

    def send_signal(self, signum: int) -> None:
        if self.alive():
            os.kill(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL the process and everything in its session, as a crash or an OOM kill would."""
        if self.process is not None:
            kill_session(self.pid)
            self.process.wait(timeout=30)

    def stop(self, signum: int = signal.SIGTERM, timeout_s: float = 15.0) -> int | None:
        """Ask politely, then kill the whole session; returns the exit status of the polite stop, if any."""
        if self.process is None:
            return None
        self.send_signal(signum)
        try:
            status = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            status = None
        kill_session(self.pid)
        self.process.wait(timeout=30)
        return status
