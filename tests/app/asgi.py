"""Driving the app at the ASGI level, for what a test client cannot send: a body that stalls or is cut."""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from tests.keys import bearer

Message = dict[str, Any]


def post_scope(app: Any, path: str, content_type: str, key: str) -> dict[str, Any]:
    """The scope of a POST to `path` with the key's bearer header and no Content-Length."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", content_type.encode()),
            *((name.lower().encode(), value.encode()) for name, value in bearer(key).items()),
        ],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
        "app": app,
    }


@dataclass
class Answer:
    """What the app sent back."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = {name.decode(): value.decode() for name, value in message["headers"]}
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")


async def call(app: Any, scope: dict[str, Any], receive: Callable[[], Awaitable[Message]]) -> Answer:
    answer = Answer()
    await app(scope, receive, answer.send)
    return answer
