"""Fixtures every test package shares: the real faces and models, and the real PostgreSQL and Redis.

The session's database is created only when a test asks for it (through `postgres_url` or `settings`).
"""

import os

# Under pytest-xdist each worker runs its own torch, and so do the worker processes the tests start (they
# inherit this environment). With torch's default of one OpenMP thread per core, two xdist workers ask for
# twice the cores the machine has, and OpenMP threads spin while they wait for each other: the same tests
# took 4.7x the CPU time. One thread each; set before anything imports torch.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from app.config import Settings
from app.db import get_engine
from app.tables import Base
from tests.queues import QueueProbe, isolated_queue
from tests.services import (
    POSTGRES_ADMIN_URL,
    REDIS_URL,
    fresh_postgres_database,
    postgres_available,
    redis_available,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("MAGTUNE_SHARED_DIR", REPO_ROOT.parent / "shared"))
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files holding a slow test first, the in-process fine-tunes (tests/worker, the longest files) before
    the end-to-end ones, each file's tests in their own order. xdist gives out whole files in this order, so
    the long ones start early and the many short tests fill the gaps around them, instead of a long file
    starting last and running alone."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow") is not None}
    worker_tests = REPO_ROOT / "tests" / "worker"
    items.sort(key=lambda item: (item.path not in slow_files, not item.path.is_relative_to(worker_tests)))


def require(condition: bool, reason: str) -> None:
    """Skip locally when a prerequisite is missing, but fail under CI, where it must be there."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    require(SHARED_DIR.is_dir(), f"shared material not found at {SHARED_DIR}")
    return SHARED_DIR


@pytest.fixture(scope="session")
def johns_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "faces" / "johns"


@pytest.fixture(scope="session")
def mobilefacenet_checkpoint(shared_dir: Path) -> Path:
    return shared_dir / "models" / "mobilefacenet" / "mobilefacenet.pt"


# ---- PostgreSQL and Redis --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A migrated database of its own for this test session, dropped afterwards; tables are emptied after
    each test that used it."""
    require(postgres_available(), f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}")
    with fresh_postgres_database(migrated=True) as url:
        yield url
        get_engine(url).dispose()


@pytest.fixture
def postgres_database() -> Iterator[str]:
    """An empty database of its own for one test, for tests that migrate it themselves."""
    require(postgres_available(), f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}")
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis server; each suite works in its own database number (tests/services.py)."""
    require(redis_available(), f"Redis not reachable at {REDIS_URL}")
    return REDIS_URL


@pytest.fixture
def broker(redis_url: str) -> Iterator[QueueProbe]:
    """A queue of this test's own, to read back the job ids the code under test sent."""
    with isolated_queue(redis_url) as queue:
        yield queue


@pytest.fixture
def settings(postgres_url: str, tmp_path: Path, broker: QueueProbe) -> Settings:
    return Settings(
        database_url=postgres_url,
        broker_url=broker.url,
        queue_name=broker.name,
        embed_queue_name=broker.embed_name,
        data_dir=tmp_path / "data",
    )


@pytest.fixture(autouse=True)
def _empty_tables(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "postgres_url" not in request.fixturenames:
        return
    url = request.getfixturevalue("postgres_url")
    names = ", ".join(table.name for table in Base.metadata.sorted_tables)
    with get_engine(url).begin() as conn:
        conn.execute(text(f"TRUNCATE {names} CASCADE"))
