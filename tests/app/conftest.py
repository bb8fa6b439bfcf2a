"""Api fixtures: a fresh PostgreSQL database per test session, emptied between tests, and a TestClient."""

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import text

from app.config import Settings
from app.db import get_engine
from app.main import create_app
from app.migrate import upgrade_database
from app.tables import Base
from tests.conftest import require

POSTGRES_ADMIN_URL = os.environ.get("MAGTUNE_TEST_POSTGRES", "postgresql://root@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("MAGTUNE_TEST_REDIS", "redis://127.0.0.1:6379/10")


def _postgres_available() -> bool:
    try:
        with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


def _redis_available() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database of its own for this test session, dropped afterwards."""
    require(_postgres_available(), f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}")
    name = f"magtune_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    url = f"{base.replace('postgresql://', 'postgresql+psycopg://', 1)}/{name}"
    upgrade_database(url)
    yield url
    get_engine(url).dispose()
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url() -> str:
    require(_redis_available(), f"Redis not reachable at {REDIS_URL}")
    return REDIS_URL


@pytest.fixture
def settings(postgres_url: str, redis_url: str, tmp_path: Path) -> Settings:
    return Settings(database_url=postgres_url, broker_url=redis_url, data_dir=tmp_path / "data")


@pytest.fixture(autouse=True)
def _empty_tables(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "postgres_url" not in request.fixturenames:
        return
    url = request.getfixturevalue("postgres_url")
    names = ", ".join(table.name for table in Base.metadata.sorted_tables)
    with get_engine(url).begin() as conn:
        conn.execute(text(f"TRUNCATE {names} CASCADE"))


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, run_sweeper=False)) as test_client:
        yield test_client
