"""List cursors: every list pages through its rows with `next_cursor` and refuses, with a 400
`invalid-cursor`, any cursor the api did not issue for that list (forged, altered or another list's)."""

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.db import session_scope
from app.tables import FeedbackPair
from tests.app.factories import activate_directly, insert_face, insert_job, insert_model
from tests.app.problems import assert_problem


def _faces(settings: Settings) -> None:
    for _ in range(3):
        insert_face(settings)


def _feedback(settings: Settings) -> None:
    faces = sorted(insert_face(settings) for _ in range(4))
    with session_scope(settings.database_url) as session:
        for a, b in [(faces[0], faces[1]), (faces[1], faces[2]), (faces[2], faces[3])]:
            session.add(FeedbackPair(face_a=a, face_b=b, label=1, split="train"))


def _jobs(settings: Settings) -> None:
    for _ in range(3):
        insert_job(settings)


def _models(settings: Settings) -> None:
    for _ in range(3):
        insert_model(settings)


def _activations(settings: Settings) -> None:
    model_id = insert_model(settings)
    for _ in range(3):
        activate_directly(settings, model_id)


LISTS: dict[str, Callable[[Settings], None]] = {
    "/v1/faces": _faces,
    "/v1/feedback": _feedback,
    "/v1/jobs": _jobs,
    "/v1/models": _models,
    "/v1/models/activations": _activations,
}


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _first_cursor(client: TestClient, settings: Settings, path: str) -> str:
    LISTS[path](settings)
    cursor = client.get(path, params={"limit": 1}).json()["next_cursor"]
    assert cursor
    return cursor


@pytest.mark.parametrize("path", LISTS)
def test_next_cursor_pages_through_every_row_once(client: TestClient, settings: Settings, path: str) -> None:
    LISTS[path](settings)
    everything = client.get(path, params={"limit": 1000}).json()["items"]

    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        response = client.get(path, params={"limit": 2} | ({"cursor": cursor} if cursor else {}))
        assert response.status_code == 200, response.text
        seen.extend(response.json()["items"])
        cursor = response.json()["next_cursor"]
        if cursor is None:
            break

    assert [row["id"] for row in seen] == [row["id"] for row in everything]
    assert len(seen) >= 3


ROW_ID = "5917aa80-25d1-4f5b-9abc-874c06e39f11"
FORGED = [
    "garbage",
    "....",
    "é",
    _b64(b"not json"),
    _b64(json.dumps(["2024-01-01T00:00:00+00:00", 5]).encode()),
    _b64(json.dumps([12, ROW_ID]).encode()),
    _b64(json.dumps({"created_at": "2024-01-01T00:00:00+00:00"}).encode()),
    _b64(json.dumps(["2024-01-01T00:00:00+00:00", ROW_ID]).encode()),
    _b64(json.dumps(["faces", "2024-01-01T00:00:00+00:00", ROW_ID]).encode()) + "." + _b64(b"x" * 16),
    _b64(json.dumps(["faces", "yesterday", ROW_ID]).encode()) + ".AAAA",
    _b64(json.dumps(None).encode()) + ".!!",
]


@pytest.mark.parametrize("path", LISTS)
@pytest.mark.parametrize("cursor", FORGED)
def test_a_forged_cursor_is_refused(client: TestClient, path: str, cursor: str) -> None:
    assert_problem(client.get(path, params={"cursor": cursor}), 400, "invalid-cursor")


@pytest.mark.parametrize("path", LISTS)
def test_a_tampered_cursor_is_refused(client: TestClient, settings: Settings, path: str) -> None:
    cursor = _first_cursor(client, settings, path)
    payload, signature = cursor.split(".")
    resource, created_at, _ = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))

    altered_payload = _b64(json.dumps([resource, created_at, ROW_ID]).encode())
    altered_signature = ("B" if signature[0] == "A" else "A") + signature[1:]
    tampered_cursors = [
        f"{altered_payload}.{signature}",
        f"{payload}.{altered_signature}",
        f"{payload}.",
        payload,
    ]
    for tampered in tampered_cursors:
        assert_problem(client.get(path, params={"cursor": tampered}), 400, "invalid-cursor")


@pytest.mark.parametrize("path", LISTS)
def test_another_lists_cursor_is_refused(client: TestClient, settings: Settings, path: str) -> None:
    other = "/v1/models" if path == "/v1/faces" else "/v1/faces"
    cursor = _first_cursor(client, settings, other)
    assert_problem(client.get(path, params={"cursor": cursor}), 400, "invalid-cursor")


def test_api_processes_with_the_same_settings_accept_each_others_cursors(
    client: TestClient, client_with: Callable[..., TestClient], settings: Settings
) -> None:
    cursor = _first_cursor(client, settings, "/v1/jobs")
    other_process = client_with()
    assert other_process.get("/v1/jobs", params={"cursor": cursor}).status_code == 200
    assert client_with(cursor_secret="s3cret").get("/v1/jobs", params={"cursor": cursor}).status_code == 400


def test_the_list_routes_document_the_invalid_cursor_problem(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in LISTS:
        refused = paths[path]["get"]["responses"]["400"]
        assert "invalid-cursor" in refused["description"]
        assert "application/problem+json" in refused["content"]
