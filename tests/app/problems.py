"""The api's error documents (RFC 9457 problem details), as the tests expect them."""

from typing import Any

from httpx import Response

PROBLEM = "application/problem+json"
PROBLEMS = "https://magtune.dev/problems/"


def assert_problem(response: Response, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["type"] == PROBLEMS + kind
    assert body["status"] == status
    assert body["title"]
    return body
