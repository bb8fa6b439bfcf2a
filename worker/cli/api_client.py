"""Just enough HTTP for the commands that talk to a running api; standard library only."""

from __future__ import annotations

import json
import mimetypes
import urllib.error
import urllib.request
import uuid
from typing import Any

from worker.cli.output import CommandError


class ApiRefused(Exception):
    """The api answered 4xx: this request was wrong (a corrupt image, say), not the connection."""


class KeyRefused(CommandError):
    """401 or 403: the key is missing, invalid or lacks a scope; every further request would fail alike."""


class ApiClient:
    """Just enough HTTP for JSON and one multipart upload.

    A 4xx reply raises ApiRefused, but 401/403 (the key) raise KeyRefused; an unreachable api or a 5xx reply
    is a CommandError that ends the import. `api_key` is sent as `Authorization: Bearer` and never printed.
    """

    def __init__(self, base_url: str, timeout_s: float, api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.api_key = api_key

    def post_json(self, path: str, body: Any) -> tuple[int, Any]:
        return self._send("POST", path, json.dumps(body).encode(), "application/json")

    def get_json(self, path: str) -> tuple[int, Any]:
        return self._send("GET", path, None, None)

    def upload(self, path: str, content: bytes, filename: str, fields: dict[str, str]) -> tuple[int, Any]:
        boundary = uuid.uuid4().hex
        media_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
            for name, value in fields.items()
        ]
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            f"Content-Type: {media_type}\r\n\r\n".encode()
            + content
            + f"\r\n--{boundary}--\r\n".encode()
        )
        return self._send("POST", path, b"".join(parts), f"multipart/form-data; boundary={boundary}")

    def _send(self, method: str, path: str, data: bytes | None, content_type: str | None) -> tuple[int, Any]:
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if content_type:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            message = f"{method} {path}: {exc.code} {_problem_text(exc.read())}"
            if exc.code in (401, 403):
                raise KeyRefused(message + _key_hint(exc.code, self.api_key)) from exc
            if 400 <= exc.code < 500:
                raise ApiRefused(message) from exc
            raise CommandError(message) from exc
        except urllib.error.URLError as exc:
            raise CommandError(f"cannot reach the api at {self.base_url}: {exc.reason}") from exc


def _key_hint(status: int, api_key: str | None) -> str:
    if status == 401 and not api_key:
        return " (no API key given: set MAGTUNE_API_KEY or pass --api-key)"
    if status == 401:
        return (
            " (the API key was refused: check MAGTUNE_API_KEY / --api-key, or create one with magtune keys)"
        )
    return " (the API key lacks the scope named above: use a key that holds it)"


def _problem_text(body: bytes) -> str:
    try:
        problem = json.loads(body)
    except ValueError:
        return body.decode(errors="replace")[:200]
    if not isinstance(problem, dict):
        return str(problem)[:200]
    return " ".join(str(problem.get(key)) for key in ("title", "detail") if problem.get(key))
