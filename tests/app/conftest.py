"""Api fixtures: TestClients over the shared `settings` (the real PostgreSQL and an isolated Redis queue)."""

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app

# Shared assertion helpers get pytest's detailed failure messages, as test modules do.
pytest.register_assert_rewrite("tests.app.problems")


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, run_sweeper=False)) as test_client:
        yield test_client


@pytest.fixture
def client_with(settings: Settings) -> Iterator[Callable[..., TestClient]]:
    """A client whose settings differ from the default ones (limits, mostly)."""
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        test_client = TestClient(create_app(settings.model_copy(update=overrides), run_sweeper=False))
        clients.append(test_client.__enter__())
        return test_client

    yield make
    for test_client in clients:
        test_client.__exit__(None, None, None)
