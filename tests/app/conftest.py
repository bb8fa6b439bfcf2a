"""Api fixtures: TestClients over the shared `settings` (the real PostgreSQL and an isolated Redis queue)."""

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from app.migrate import upgrade_database
from tests.keys import bearer, issue_test_key

# Shared assertion helpers get pytest's detailed failure messages, as test modules do.
pytest.register_assert_rewrite("tests.app.problems")


@pytest.fixture
def all_scopes_key(settings: Settings) -> str:
    """A key holding every scope: what the default clients send, so a test need not think about keys."""
    return issue_test_key(settings.database_url)


@pytest.fixture
def client(settings: Settings, all_scopes_key: str) -> Iterator[TestClient]:
    with TestClient(create_app(settings, run_sweeper=False), headers=bearer(all_scopes_key)) as test_client:
        yield test_client


@pytest.fixture
def anonymous_client(settings: Settings) -> Iterator[TestClient]:
    """A client that sends no key."""
    with TestClient(create_app(settings, run_sweeper=False)) as test_client:
        yield test_client


@pytest.fixture
def client_with(settings: Settings, all_scopes_key: str) -> Iterator[Callable[..., TestClient]]:
    """A client whose settings differ from the default ones (limits, mostly), with the every-scope key."""
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        test_client = TestClient(
            create_app(settings.model_copy(update=overrides), run_sweeper=False),
            headers=bearer(all_scopes_key),
        )
        clients.append(test_client.__enter__())
        return test_client

    yield make
    for test_client in clients:
        test_client.__exit__(None, None, None)


@pytest.fixture(params=["postgresql", "sqlite"])
def any_settings(request: pytest.FixtureRequest, settings: Settings, tmp_path: Path) -> Settings:
    """The shared settings on PostgreSQL, or the same on a migrated SQLite file of this test's own."""
    if request.param == "postgresql":
        return settings
    url = f"sqlite:///{tmp_path / 'magtune.db'}"
    upgrade_database(url)
    return settings.model_copy(update={"database_url": url})
