"""Bound every request body before anything parses it.

FastAPI reads a JSON body whole, then parses and validates it, so a 100 MB batch took the api's memory from
130 MB to 760 MB before the 413 for too many items. This ASGI middleware answers 413 `body-too-large`
from `Content-Length` alone when it says too much, and otherwise reads at most the route's limit before
handing the body on, so no route ever sees (or parses) more than its limit. The limit is per route: the
feedback batch gets `max_batch_body_bytes`, every other route `max_json_body_bytes`; the upload routes,
which stream multipart bodies to disk under their own byte limits, are left to `app.uploads`.

It also bounds time: a body that stops arriving would otherwise hold a connection, a task and (for an
upload) a staged file for as long as the client likes. A JSON body must arrive whole within
`body_timeout_s`; an upload, which may rightly take minutes, may not pause longer than that between two
chunks. Either is answered 408 `body-timeout` and the connection closed.
"""

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings
from app.problems import Problem, problem_response

# Routes that stream their body themselves (app.uploads), bounded by max_image_bytes / max_checkpoint_bytes.
STREAMED_ROUTES = frozenset({("POST", "/v1/faces"), ("POST", "/v1/models")})
BATCH_ROUTES = frozenset({("POST", "/v1/feedback/batch")})


class _TooLarge(Exception):
    pass


def body_limit(settings: Settings, method: str, path: str) -> int | None:
    """The most bytes a request to this route may carry; None for the routes that bound their own."""
    route = (method, path.rstrip("/") or "/")
    if route in STREAMED_ROUTES:
        return None
    if route in BATCH_ROUTES:
        return settings.max_batch_body_bytes
    return settings.max_json_body_bytes


def _too_large(limit: int) -> Problem:
    return Problem(
        413,
        "body-too-large",
        "Request body too large",
        f"this route takes a body of at most {limit} bytes",
        max_bytes=limit,
    )


def _body_timeout(seconds: float) -> Problem:
    return Problem(
        408,
        "body-timeout",
        "Request body timeout",
        f"the body did not arrive within {seconds:g} s",
        headers={"Connection": "close"},
    )


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = body_limit(self.settings, scope["method"], scope["path"])
        timeout = self.settings.body_timeout_s
        if limit is None:
            await self.app(scope, _paced(receive, timeout), send)
            return
        try:
            declared = _content_length(scope)
            if declared is not None and declared > limit:
                raise _TooLarge
            async with asyncio.timeout(timeout):  # a timer handle: far cheaper than an anyio cancel scope
                body, more = await _read_up_to(receive, limit)
        except _TooLarge:
            await problem_response(_too_large(limit))(scope, receive, send)
            return
        except TimeoutError:
            await problem_response(_body_timeout(timeout))(scope, receive, send)
            return
        await self.app(scope, _replay(body, more, receive), send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _read_up_to(receive: Receive, limit: int) -> tuple[bytes, Message | None]:
    """The whole body, refused past `limit`; a disconnect is returned for the app to see."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), message
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), None


def _paced(receive: Receive, timeout: float) -> Receive:
    """`receive` that raises 408 when the next piece of an unfinished body takes longer than `timeout`; once
    the body is complete it waits as long as the app likes (for a disconnect, say)."""
    complete = False

    async def paced() -> Message:
        nonlocal complete
        if complete:
            return await receive()
        try:
            async with asyncio.timeout(timeout):
                message = await receive()
        except TimeoutError:
            raise _body_timeout(timeout) from None
        complete = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    return paced


def _replay(body: bytes, pending: Message | None, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            if pending is not None:
                return pending
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
