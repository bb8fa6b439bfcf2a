"""Request bodies are bounded per route before anything parses them (app/body_limit.py)."""

import io
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.main import create_app
from app.problems import PROBLEM_MEDIA_TYPE
from app.tables import Face, FeedbackPair
from tests.app.asgi import Answer, call, post_scope
from tests.app.factories import count_rows, insert_face
from tests.app.problems import assert_problem

LIMIT = 4096


@pytest.fixture
def limited(client_with: Callable[..., TestClient]) -> TestClient:
    return client_with(max_json_body_bytes=LIMIT, max_batch_body_bytes=4 * LIMIT)


def batch_of(settings: Settings, size: int) -> bytes:
    """A batch body of valid pairs, padded with spaces (valid JSON) to exactly `size` bytes."""
    faces = [insert_face(settings, split="train") for _ in range(3)]
    items = [{"face_a": str(faces[0]), "face_b": str(other), "label": 1} for other in faces[1:]]
    body = json.dumps({"items": items}).encode()
    assert len(body) <= size
    return body + b" " * (size - len(body))


def chunks(body: bytes, size: int = 1000) -> Iterator[bytes]:
    """The body without a Content-Length: the limit must hold while it streams."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


def test_a_body_over_the_limit_is_refused_by_its_length_and_nothing_is_stored(
    limited: TestClient, settings: Settings
) -> None:
    body = batch_of(settings, 4 * LIMIT + 1)

    problem = assert_problem(
        limited.post("/v1/feedback/batch", content=body, headers={"content-type": "application/json"}),
        413,
        "body-too-large",
    )

    assert problem["max_bytes"] == 4 * LIMIT
    assert count_rows(settings, FeedbackPair) == 0


def test_a_streamed_body_is_cut_off_at_the_limit(limited: TestClient, settings: Settings) -> None:
    body = batch_of(settings, 4 * LIMIT + 1)

    response = limited.post(
        "/v1/feedback/batch", content=chunks(body), headers={"content-type": "application/json"}
    )

    assert "content-length" not in response.request.headers
    assert_problem(response, 413, "body-too-large")
    assert count_rows(settings, FeedbackPair) == 0


def test_a_body_at_the_limit_is_accepted(limited: TestClient, settings: Settings) -> None:
    body = batch_of(settings, 4 * LIMIT)

    response = limited.post(
        "/v1/feedback/batch", content=chunks(body), headers={"content-type": "application/json"}
    )

    assert response.status_code == 200, response.text
    assert response.json()["created"] == 2


def test_the_limit_is_per_route(limited: TestClient, settings: Settings) -> None:
    """A body the batch route takes is too large for a single pair, and for any other route."""
    faces = [insert_face(settings, split="train") for _ in range(2)]
    single = json.dumps({"face_a": str(faces[0]), "face_b": str(faces[1]), "label": 1}).encode()
    padded = single + b" " * (2 * LIMIT)
    headers = {"content-type": "application/json"}

    assert_problem(limited.post("/v1/feedback", content=padded, headers=headers), 413, "body-too-large")
    assert_problem(
        limited.post(f"/v1/models/{uuid.uuid4()}/activate", content=padded, headers=headers),
        413,
        "body-too-large",
    )
    assert limited.post("/v1/feedback", content=single, headers=headers).status_code == 201


def test_another_content_type_does_not_escape_the_limit(limited: TestClient, settings: Settings) -> None:
    body = batch_of(settings, 4 * LIMIT + 1)

    response = limited.post(
        "/v1/feedback/batch", content=body, headers={"content-type": "multipart/form-data; boundary=x"}
    )

    assert_problem(response, 413, "body-too-large")


def test_uploads_keep_their_own_larger_limit(limited: TestClient, settings: Settings) -> None:
    image = io.BytesIO()
    Image.effect_noise((128, 128), 64).convert("RGB").save(image, format="PNG")
    assert len(image.getvalue()) > LIMIT

    response = limited.post("/v1/faces", files={"file": ("face.png", image.getvalue())})

    assert response.status_code == 201, response.text
    assert count_rows(settings, Face) == 1


HEAD = b'--cut\r\nContent-Disposition: form-data; name="file"; filename="f.png"\r\n\r\n'


@pytest.mark.parametrize(
    ("path", "content_type"),
    [("/v1/feedback", "application/json"), ("/v1/faces", "multipart/form-data; boundary=cut")],
)
def test_a_body_that_stops_arriving_is_answered_408_and_the_connection_closed(
    settings: Settings, all_scopes_key: str, path: str, content_type: str
) -> None:
    app = create_app(settings.model_copy(update={"body_timeout_s": 0.5}), run_sweeper=False)
    messages = [{"type": "http.request", "body": HEAD, "more_body": True}]

    async def stall() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await anyio.sleep(60)  # the client sends nothing more
        return {"type": "http.disconnect"}

    async def stalled() -> Answer:
        with anyio.fail_after(10):
            return await call(app, post_scope(app, path, content_type, all_scopes_key), stall)

    answer = anyio.run(stalled)

    assert (answer.status, answer.headers["content-type"]) == (408, PROBLEM_MEDIA_TYPE)
    assert answer.headers["connection"] == "close"
    assert json.loads(answer.body)["type"].endswith("/body-timeout")
    assert count_rows(settings, Face) == 0 and count_rows(settings, FeedbackPair) == 0
