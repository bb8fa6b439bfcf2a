"""`magtune serve --workers N`: N api processes behind one port, each serving requests."""

import subprocess
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Launch
from tests.e2e.services import client_with_key, free_port, magtune_command, service_environment

pytestmark = pytest.mark.slow


def _spawned_children(parent: int) -> list[int]:
    """The processes uvicorn's supervisor started with multiprocessing's spawn (its workers)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        if ppid == parent and b"spawn_main" in cmdline:
            children.append(int(entry.name))
    return children


def _established(pid: int, port: int) -> int:
    """How many TCP connections to `port` are open (ESTABLISHED) in process `pid`."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port and fields[3] == "01" and fields[9] in inodes:
            count += 1
    return count


def _readyz_count(metrics: str) -> float:
    prefix = 'magtune_http_request_duration_seconds_count{method="GET",route="/readyz",status="200"}'
    return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(prefix))


def test_serve_with_two_workers_answers_from_two_processes(
    service_settings: dict[str, str], launch: Launch, issue_key: Callable[..., str]
) -> None:
    port = free_port()
    server = launch(
        "api", ["serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"], service_settings
    )
    url = f"http://127.0.0.1:{port}"
    server.wait_for_http(f"{url}/readyz")
    server.wait_until(
        lambda: len(_spawned_children(server.pid)) == 2, what="running two workers", timeout_s=60
    )
    workers = _spawned_children(server.pid)

    # Keep-alive connections stay with the process that accepted them: hold many open, each having had its
    # answer, and see that both processes hold some.
    with ExitStack() as stack:
        clients = [stack.enter_context(httpx.Client(base_url=url, timeout=30.0)) for _ in range(32)]
        for client in clients:
            assert client.get("/readyz").status_code == 200
        held = {pid: _established(pid, port) for pid in workers}
    assert sum(held.values()) == len(clients), held
    assert all(count > 0 for count in held.values()), f"one process served every connection: {held}"

    # /metrics merges the processes' figures (prometheus_client's multiprocess mode), whichever answers.
    with client_with_key(url, issue_key("metrics:read")) as client:
        response = client.get("/metrics")
    assert response.status_code == 200, response.text
    counted = _readyz_count(response.text)
    assert counted >= len(clients), counted


@pytest.mark.parametrize("workers", ["0", "65", "two"])
def test_serve_refuses_a_worker_count_out_of_range(workers: str, service_settings: dict[str, str]) -> None:
    done = subprocess.run(
        magtune_command("serve", "--port", str(free_port()), "--workers", workers),
        env=service_environment(service_settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done
    assert "--workers" in done.stderr
