"""The api's memory of verified keys (app/auth/key_cache.py): it saves the database read, and any change to a
key, however it is made, takes it away."""

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, text

from app.auth.key_cache import APPLICATION_NAME, KeyCache
from app.auth.keys import Caller, remembered_caller
from app.config import Settings
from app.db import get_engine
from app.main import create_app
from tests.app.problems import assert_problem
from tests.keys import bearer, issue_test_key, key_id
from tests.services import POSTGRES_ADMIN_URL

CALLER = Caller(key_id="0123456789abcdef", name="t", scopes=frozenset({"faces:read"}))
DIGEST = b"d" * 32
NOW = datetime(2026, 12, 7, tzinfo=UTC)


def live_cache() -> KeyCache:
    cache = KeyCache()
    cache.forget_all(live=True)
    return cache


def test_a_cache_remembers_only_what_no_change_has_touched() -> None:
    cache = KeyCache()
    cache.store(CALLER.key_id, DIGEST, CALLER, None, cache.generation())
    assert cache.lookup(CALLER.key_id, DIGEST, NOW) is None, "trusted before its listener is connected"

    cache = live_cache()
    cache.store(CALLER.key_id, DIGEST, CALLER, None, cache.generation())
    assert cache.lookup(CALLER.key_id, DIGEST, NOW) == CALLER
    assert cache.lookup(CALLER.key_id, b"x" * 32, NOW) is None, "another secret for the same id"

    taken = cache.generation()
    cache.forget_all()  # a notification arrives while a request reads the key
    cache.store(CALLER.key_id, DIGEST, CALLER, None, taken)
    assert cache.lookup(CALLER.key_id, DIGEST, NOW) is None, "a read that raced a change was kept"

    cache.store(CALLER.key_id, DIGEST, CALLER, NOW + timedelta(seconds=1), cache.generation())
    assert cache.lookup(CALLER.key_id, DIGEST, NOW) == CALLER
    assert cache.lookup(CALLER.key_id, DIGEST, NOW + timedelta(seconds=1)) is None, "expired"

    cache.forget_all(live=False)
    assert cache.generation() is None and cache.lookup(CALLER.key_id, DIGEST, NOW) is None


@pytest.fixture
def app_client(settings: Settings) -> Iterator[TestClient]:
    """An api with its lifespan running (the listener included), and no key of its own."""
    with TestClient(create_app(settings, run_sweeper=False)) as client:
        yield client


def wait_live(client: TestClient) -> KeyCache:
    cache: KeyCache = client.app.state.key_cache  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while cache.generation() is None:
        assert time.monotonic() < deadline, "the key listener never connected"
        time.sleep(0.02)
    return cache


def key_reads(settings: Settings) -> list[str]:
    """Every statement the api sends that reads api_keys, from now on."""
    seen: list[str] = []

    def note(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if "FROM api_keys" in statement:
            seen.append(statement)

    event.listen(get_engine(settings.database_url), "before_cursor_execute", note)
    return seen


def wait_forgotten(cache: KeyCache, generation: int | None) -> None:
    deadline = time.monotonic() + 5
    while cache.generation() == generation:
        assert time.monotonic() < deadline, "no notification reached the listener"
        time.sleep(0.005)


def test_a_verified_key_costs_no_database_read_until_sql_typed_by_hand_revokes_it(
    settings: Settings, app_client: TestClient
) -> None:
    cache = wait_live(app_client)
    key = issue_test_key(settings.database_url)
    reads = key_reads(settings)
    assert app_client.get("/v1/faces", headers=bearer(key)).status_code == 200
    assert len(reads) == 1
    for _ in range(3):
        assert app_client.get("/v1/faces", headers=bearer(key)).status_code == 200
    assert len(reads) == 1, "a verified key was read again"

    generation = cache.generation()
    with get_engine(settings.database_url).begin() as conn:  # not through the api: an operator's SQL
        conn.execute(text("UPDATE api_keys SET revoked_at = now() WHERE id = :id"), {"id": key_id(key)})
    wait_forgotten(cache, generation)
    refused = app_client.get("/v1/faces", headers=bearer(key))
    assert assert_problem(refused, 401, "unauthenticated")["detail"] == f"key {key_id(key)} is revoked"


@pytest.mark.parametrize(
    "change",
    [
        "UPDATE api_keys SET scopes = '[\"faces:write\"]' WHERE id = :id",
        "UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = :id",
        "DELETE FROM api_keys WHERE id = :id",
    ],
)
def test_every_change_that_matters_is_announced_but_last_used_is_not(settings: Settings, change: str) -> None:
    key = issue_test_key(settings.database_url)
    with psycopg.connect(
        POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + _database(settings), autocommit=True
    ) as ear:
        ear.execute("LISTEN magtune_api_keys")
        with get_engine(settings.database_url).begin() as conn:
            conn.execute(text("UPDATE api_keys SET last_used_at = now() WHERE id = :id"), {"id": key_id(key)})
            conn.execute(text(change), {"id": key_id(key)})
        heard = [notice.payload for notice in ear.notifies(timeout=2, stop_after=1)]
    assert heard == [key_id(key)]


def test_the_cache_is_off_while_its_listener_is_disconnected(
    settings: Settings, app_client: TestClient
) -> None:
    cache = wait_live(app_client)
    key = issue_test_key(settings.database_url)
    assert app_client.get("/v1/faces", headers=bearer(key)).status_code == 200
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s "
            "AND datname = %s",
            (APPLICATION_NAME, _database(settings)),
        )
    deadline = time.monotonic() + 5
    while remembered_caller(cache, key) is not None:
        assert time.monotonic() < deadline, "the cache stayed trusted after its listener lost its connection"
        time.sleep(0.01)
    reads = key_reads(settings)
    assert app_client.get("/v1/faces", headers=bearer(key)).status_code == 200
    assert reads, "the key was answered from a cache no one keeps honest"
    wait_live(app_client)  # and it reconnects on its own


def _database(settings: Settings) -> str:
    return settings.database_url.rsplit("/", 1)[1]
