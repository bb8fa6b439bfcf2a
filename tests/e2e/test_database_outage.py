"""A real `magtune serve` while its PostgreSQL database goes away and comes back.

The outage is real: the database stops accepting connections and every open one is terminated, then it
accepts them again. Over one keep-alive connection, the api answers 503 `database-unavailable` with
`Retry-After` (never a plain-text 500, never a reset connection) and serves again on its own afterwards.
"""

import time
from collections.abc import Callable

import httpx
import psycopg
import pytest

from tests.e2e.services import RunningApi
from tests.keys import bearer
from tests.services import POSTGRES_ADMIN_URL

pytestmark = pytest.mark.slow

REQUESTS_DURING = 20
RECOVERY_S = 30.0


def _allow_connections(database: str, allowed: bool) -> None:
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {str(allowed).lower()}')
        if not allowed:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            )


def test_an_outage_gives_503s_on_a_healthy_connection_and_the_api_recovers(
    service_settings: dict[str, str], api: RunningApi, issue_key: Callable[..., str]
) -> None:
    database = service_settings["MAGTUNE_DATABASE_URL"].rsplit("/", 1)[1]
    peers: set[object] = set()

    def note_peer(response: httpx.Response) -> None:
        stream = response.extensions.get("network_stream")
        if stream is not None:
            peers.add(stream.get_extra_info("client_addr"))

    key = bearer(issue_key())
    with httpx.Client(
        base_url=api.url, timeout=30.0, event_hooks={"response": [note_peer]}, headers=key
    ) as http:
        assert http.get("/v1/faces").status_code == 200

        _allow_connections(database, False)
        try:
            during = [http.get("/v1/faces") for _ in range(REQUESTS_DURING)]
            during.append(http.post("/v1/jobs", json={"kind": "reindex", "params": {}}))
            ready = http.get("/readyz")
        finally:
            _allow_connections(database, True)

        deadline = time.monotonic() + RECOVERY_S
        after = http.get("/v1/faces")
        while after.status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
            after = http.get("/v1/faces")

    for response in during:
        assert response.status_code == 503, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["type"].endswith("/database-unavailable")
        assert response.headers["retry-after"] == "5"
    assert ready.status_code == 503 and ready.json()["down"] == ["database"]
    assert after.status_code == 200, after.text
    assert len(peers) == 1, f"every request went over one keep-alive connection, not {len(peers)}"
