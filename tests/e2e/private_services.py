"""A PostgreSQL and a Redis of a test's own, on spare ports, that the test may stop and start at will.

The machine's own servers (5432, 6379) are shared with every other test and must never go down; these are
started from the installed binaries in a temporary directory, with trust auth and no durability (fsync off,
no snapshots), and always stopped afterwards. A restart keeps the port, so a process pointed at one sees a
real outage and a real return. As root, PostgreSQL refuses to run, so its commands run as `postgres`.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psycopg
import redis

from tests.conftest import require
from tests.e2e.services import free_port

START_TIMEOUT_S = 30.0
NO_PERSISTENCE = ("--save", "", "--appendonly", "no")


def postgres_bin_dir() -> Path | None:
    """The newest installed server's bin folder (Debian layout), else the folder of `initdb` on PATH."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True):
        if (Path(candidate) / "initdb").is_file():
            return Path(candidate)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _version(bin_dir: str) -> float:
    try:
        return float(Path(bin_dir).parent.name)
    except ValueError:
        return 0.0


class PrivatePostgres:
    """One cluster in `root` on `port`; `stop()` and `start()` take it down and bring it back."""

    def __init__(self, bin_dir: Path, root: Path) -> None:
        self.bin_dir = bin_dir
        self.root = root
        self.data_dir = root / "data"
        self.socket_dir = root / "sockets"
        self.log_path = root / "postgres.log"
        self.port = free_port()
        self._as_postgres = os.geteuid() == 0

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin_dir / tool), *args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=self.root)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")

    def init(self) -> PrivatePostgres:
        self.socket_dir.mkdir()
        if self._as_postgres:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.socket_dir, "postgres")
        self._run("initdb", "-D", str(self.data_dir), "-U", "postgres", "--auth=trust", "--no-sync")
        return self

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off"
        )
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_path), "-o", options, "-w", "start")

    def stop(self) -> None:
        """A fast shutdown: open sessions are cut, new connections refused, as in a real restart."""
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")

    def running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists()

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def create_database(self, name: str) -> str:
        """An empty database; its SQLAlchemy URL, as MAGTUNE_DATABASE_URL takes it."""
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"


class PrivateRedis:
    """One `redis-server` on `port`, keeping nothing on disk, so a restart comes back empty."""

    def __init__(self, binary: str, root: Path) -> None:
        self.binary = binary
        self.root = root
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.root)]
        with (self.root / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(
                [*command, *NO_PERSISTENCE],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {(self.root / 'redis.log').read_text()}")
            time.sleep(0.05)

    def _answers(self) -> bool:
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM: with no persistence configured the server exits at once and keeps nothing."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)


@contextmanager
def _scratch_dir() -> Iterator[Path]:
    """A fresh folder under the system's temp dir: pytest's tmp_path is closed to the `postgres` user."""
    root = Path(tempfile.mkdtemp(prefix="magtune-private-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A running private PostgreSQL, stopped and removed afterwards whatever state the test left it in."""
    bin_dir = postgres_bin_dir()
    require(bin_dir is not None, "PostgreSQL server binaries (initdb, pg_ctl) not installed")
    assert bin_dir is not None
    require(os.geteuid() != 0 or shutil.which("runuser") is not None, "runuser not found (needed as root)")
    with _scratch_dir() as root:
        server = PrivatePostgres(bin_dir, root).init()
        server.start()
        try:
            yield server
        finally:
            if server.running():
                with suppress(RuntimeError):
                    server.stop()


@contextmanager
def private_redis() -> Iterator[PrivateRedis]:
    """A running private Redis, stopped afterwards."""
    binary = shutil.which("redis-server")
    require(binary is not None, "redis-server not installed")
    assert binary is not None
    with _scratch_dir() as root:
        server = PrivateRedis(binary, root)
        server.start()
        try:
            yield server
        finally:
            server.stop()


@contextmanager
def outage(server: PrivatePostgres | PrivateRedis) -> Iterator[None]:
    """The server is down inside the block and running again after it, even when the block fails."""
    server.stop()
    try:
        yield
    finally:
        server.start()
