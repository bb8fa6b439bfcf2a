"""The api runs its synchronous endpoints on `api_threads` threads, not anyio's default of 40."""

from collections.abc import Callable

import anyio.to_thread
from fastapi.testclient import TestClient

from app.config import Settings


def _thread_limit(client: TestClient) -> float:
    return client.portal.call(lambda: anyio.to_thread.current_default_thread_limiter().total_tokens)


def test_the_thread_limit_is_the_setting(client_with: Callable[..., TestClient]) -> None:
    with client_with(api_threads=3) as client:
        assert _thread_limit(client) == 3
        assert client.get("/v1/faces").status_code == 200  # a synchronous endpoint still answers


def test_the_default_is_sixteen(client: TestClient, settings: Settings) -> None:
    assert settings.api_threads == 16
    assert _thread_limit(client) == 16
