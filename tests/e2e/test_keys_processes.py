"""API keys across real processes: `magtune keys`, two `magtune serve` processes, and the loopback rule."""

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Launch, start_api
from tests.e2e.services import client_with_key, magtune_command, service_environment


def _keys(settings: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        magtune_command("keys", *args),
        env=service_environment(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_keys_command_creates_lists_and_revokes(service_settings: dict[str, str]) -> None:
    created = _keys(
        service_settings, "create", "--name", "frontend", "--scopes", "faces:write,feedback:write"
    )

    assert created.returncode == 0, created.stderr
    key = created.stdout.splitlines()[0]
    assert re.fullmatch(r"mt_[0-9a-f]{16}_[A-Za-z0-9_-]{43}", key)
    assert "only time the key is shown" in created.stdout
    key_id = key.split("_")[1]

    listed = _keys(service_settings, "list", "--json")
    (record,) = json.loads(listed.stdout)["keys"]
    assert (record["id"], record["state"], record["scopes"]) == (
        key_id,
        "active",
        ["faces:write", "feedback:write"],
    )
    assert key.split("_", 2)[2] not in listed.stdout

    revoked = _keys(service_settings, "revoke", key_id, "--json")
    assert revoked.returncode == 0 and json.loads(revoked.stdout)["state"] == "revoked"
    assert json.loads(_keys(service_settings, "list", "--json").stdout)["keys"][0]["state"] == "revoked"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("create", "--name", "x", "--scopes", "faces:rule"), "--scopes: unknown faces:rule"),
        (("create", "--name", "x", "--scopes", "faces:read", "--expires-in", "soon"), "--expires-in 'soon'"),
        (("revoke", "0123456789abcdef"), "no key with id '0123456789abcdef'"),
    ],
)
def test_keys_command_refuses_bad_input(
    service_settings: dict[str, str], args: tuple[str, ...], message: str
) -> None:
    done = _keys(service_settings, *args)

    assert done.returncode == 2
    assert message in done.stderr
    assert json.loads(_keys(service_settings, "list", "--json").stdout)["keys"] == []


@pytest.mark.slow
def test_a_key_revoked_through_one_api_process_is_refused_by_another(
    service_settings: dict[str, str], launch: Launch, issue_key: Callable[..., str]
) -> None:
    one, two = start_api(launch, service_settings), start_api(launch, service_settings)
    admin = issue_key("admin")
    frontend = issue_key("faces:read")
    with (
        client_with_key(one.url, admin) as admin_on_one,
        client_with_key(two.url, frontend) as frontend_on_two,
    ):
        assert frontend_on_two.get("/v1/faces").status_code == 200

        assert admin_on_one.post(f"/v1/keys/{frontend.split('_')[1]}/revoke").status_code == 200

        refused = frontend_on_two.get("/v1/faces")
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Bearer")
        bad = httpx.get(f"{two.url}/v1/faces", headers={"Authorization": f"Bearer {frontend[:-4]}ZZZZ"})
        assert bad.status_code == 401
    for api in (one, two):
        log = api.process.log_text()
        assert "/v1/" in log, "requests are logged"
        assert frontend.split("_", 2)[2][:12] not in log and admin.split("_", 2)[2][:12] not in log


@pytest.mark.parametrize("command", [["serve", "--host", "0.0.0.0"], ["up", "--host", "0.0.0.0"]])
def test_auth_off_is_refused_off_loopback(tmp_path: Path, command: list[str]) -> None:
    settings = {"MAGTUNE_AUTH_DISABLED": "true", "MAGTUNE_DATA_DIR": str(tmp_path / "data")}
    done = subprocess.run(
        magtune_command(*command, "--port", "1"),
        env=service_environment(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 2
    assert "MAGTUNE_AUTH_DISABLED=true is allowed only on a loopback address" in done.stderr
    assert not (tmp_path / "data").exists(), "nothing was started or created"
