"""Outages and unexpected failures answer problem+json (app/failures.py), against a real PostgreSQL.

The database outage is real: a database that refuses connections (a closed port), and one whose connections
are cut and refused while the api runs (`ALLOW CONNECTIONS false` and `pg_terminate_backend`), then allowed
again. The blob store outage is a data directory where no directory can be made.
"""

import io
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.db import get_engine
from app.main import create_app
from app.tables import Face, ModelVersion
from tests.app.asgi import call, post_scope
from tests.app.factories import count_rows
from tests.app.problems import assert_problem
from tests.keys import bearer, issue_test_key
from tests.services import POSTGRES_ADMIN_URL, fresh_postgres_database

CLOSED_PORT_DATABASE = "postgresql+psycopg://root@127.0.0.1:1/magtune?connect_timeout=2"


def png() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((112, 112), 60).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def assert_database_unavailable(response: object) -> None:
    assert_problem(response, 503, "database-unavailable")  # type: ignore[arg-type]
    assert response.headers["retry-after"] == "5"  # type: ignore[attr-defined]
    assert "Traceback" not in response.text  # type: ignore[attr-defined]


def test_a_database_that_refuses_connections_is_a_503_on_every_route(settings: Settings) -> None:
    down = settings.model_copy(update={"database_url": CLOSED_PORT_DATABASE})
    face = str(uuid.uuid4())
    # A well-formed key: checking it is the first thing that needs the database.
    key = "mt_" + "0" * 16 + "_" + "A" * 43
    with TestClient(create_app(down, run_sweeper=False), headers=bearer(key)) as client:
        responses = [
            client.get("/v1/faces"),
            client.get(f"/v1/faces/{face}"),
            client.post("/v1/feedback", json={"face_a": face, "face_b": str(uuid.uuid4()), "label": 1}),
            client.post("/v1/jobs", json={"kind": "reindex", "params": {}}),
            client.get("/v1/models"),
            client.get("/v1/metrics"),
        ]

    for response in responses:
        assert_database_unavailable(response)


@pytest.fixture
def own_database() -> Iterator[str]:
    with fresh_postgres_database(migrated=True) as url:
        yield url
        get_engine(url).dispose()


def _allow_connections(url: str, allowed: bool) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allowed).lower()}')
        if not allowed:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> "
                "pg_backend_pid()",
                (name,),
            )


def test_an_outage_during_traffic_is_a_503_and_the_api_recovers_on_its_own(
    settings: Settings, own_database: str
) -> None:
    own = settings.model_copy(update={"database_url": own_database})
    key = issue_test_key(own_database)
    with TestClient(create_app(own, run_sweeper=False), headers=bearer(key)) as client:
        assert client.get("/v1/faces").status_code == 200  # the pool holds a live connection now

        _allow_connections(own_database, False)
        try:
            during = [client.get("/v1/faces"), client.post("/v1/faces", files={"file": ("f.png", png())})]
        finally:
            _allow_connections(own_database, True)
        after = client.get("/v1/faces")

    for response in during:
        assert_database_unavailable(response)
    assert after.status_code == 200, after.text
    assert after.json()["items"] == [], "the upload refused during the outage left no face"


@pytest.fixture
def unwritable(settings: Settings, tmp_path: Path) -> Settings:
    """The data directory is a regular file: no blob directory can be made under it (root included)."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"")
    return settings.model_copy(update={"data_dir": blocker})


def test_an_unwritable_blob_store_is_a_503_and_keeps_nothing(
    unwritable: Settings, all_scopes_key: str
) -> None:
    with TestClient(create_app(unwritable, run_sweeper=False), headers=bearer(all_scopes_key)) as client:
        face = client.post("/v1/faces", files={"file": ("f.png", png())})
        model = client.post("/v1/models", files={"file": ("m.pt", b"PK\x03\x04")}, data={"arch": "iresnet18"})
        ready = client.get("/readyz")

    for response in (face, model):
        assert_problem(response, 503, "storage-unavailable")
        assert response.headers["retry-after"] == "30"
    assert count_rows(unwritable, Face) == count_rows(unwritable, ModelVersion) == 0
    problem = assert_problem(ready, 503, "not-ready")
    assert problem["down"] == ["blob_store"]


def test_an_unexpected_failure_is_a_500_problem_that_tells_nothing_and_is_logged(
    settings: Settings, caplog: pytest.LogCaptureFixture, all_scopes_key: str
) -> None:
    app = create_app(settings, run_sweeper=False)

    @app.get("/v1/explode")
    def explode() -> None:
        raise RuntimeError("secret internals: /srv/magtune password=hunter2")

    with (
        caplog.at_level(logging.ERROR, logger="app.failures"),
        TestClient(app, raise_server_exceptions=False, headers=bearer(all_scopes_key)) as client,
    ):
        response = client.get("/v1/explode")

    problem = assert_problem(response, 500, "internal-error")
    assert "secret" not in response.text and "RuntimeError" not in response.text
    assert problem["detail"] == "the server failed to answer; the failure is logged"
    assert any("secret internals" in (record.exc_text or "") for record in caplog.records)


def test_the_document_describes_every_error_as_a_problem(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    problem = {"schema": {"$ref": "#/components/schemas/Problem"}}

    operations = [(path, op) for path, item in document["paths"].items() for op in item.values()]
    assert len(operations) > 20
    for path, operation in operations:
        responses = operation["responses"]
        if path.startswith("/v1/"):
            assert {"500", "503"} <= set(responses), path
        if "requestBody" in operation and path.startswith("/v1/"):
            assert {"408", "413"} <= set(responses), path
            media_types = set(operation["requestBody"]["content"])
            if "application/json" in media_types:
                assert "invalid-json" in responses["400"]["description"], path
            if any(p["name"].lower() == "idempotency-key" for p in operation.get("parameters", [])):
                assert "Idempotency-Key" in responses["409"]["description"], path
            if "multipart/form-data" in media_types:
                assert "malformed-multipart" in responses["400"]["description"], path
                assert "expected-multipart" in responses["415"]["description"], path
        for status, response in responses.items():
            if int(status) >= 400:
                assert response["content"] == {"application/problem+json": problem}, (path, status)
    assert "HTTPValidationError" not in document["components"]["schemas"]
    assert document["components"]["schemas"]["Problem"]["required"] == ["type", "title", "status"]


def test_a_client_leaving_mid_upload_leaves_no_error_in_the_log_and_no_file(
    settings: Settings, caplog: pytest.LogCaptureFixture, all_scopes_key: str
) -> None:
    """Driven at the ASGI level: the body's first part arrives, then the disconnect."""
    import asyncio

    app = create_app(settings, run_sweeper=False)
    head = b'--cut\r\nContent-Disposition: form-data; name="file"; filename="f.png"\r\n\r\n' + png()[:500]
    messages = [
        {"type": "http.request", "body": head, "more_body": True},
        {"type": "http.disconnect"},
    ]
    scope = post_scope(app, "/v1/faces", "multipart/form-data; boundary=cut", all_scopes_key)

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    with caplog.at_level(logging.INFO):
        answer = asyncio.run(call(app, scope, receive))

    assert answer.status == 400
    assert [record for record in caplog.records if record.levelno >= logging.ERROR] == []
    assert any("disconnected" in record.getMessage() for record in caplog.records)
    faces = settings.blob_dir / "faces"
    assert not faces.exists() or [path for path in faces.rglob("*") if path.is_file()] == []
    assert count_rows(settings, Face) == 0


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/v1/faces/00000000-0000-4000-8000-000000000001", "DELETE, GET"),
        ("PATCH", "/v1/faces", "GET, POST"),
        ("DELETE", "/v1/jobs", "GET, POST"),
        ("POST", "/healthz", "GET"),
        ("PUT", "/v1/feedback/batch", "POST"),  # its own path, never taken for a feedback id
        ("DELETE", "/v1/feedback/batch", "POST"),
    ],
)
def test_a_method_not_allowed_names_every_method_of_the_path(
    client: TestClient, method: str, path: str, allowed: str
) -> None:
    response = client.request(method, path)

    assert_problem(response, 405, "http-405")
    assert response.headers["allow"] == allowed


def test_a_body_that_is_not_json_is_a_400_problem_and_json_that_does_not_fit_a_422(
    client: TestClient,
) -> None:
    broken = client.post("/v1/feedback", content=b'{"face_a": ', headers={"content-type": "application/json"})
    misfit = client.post("/v1/feedback", json={"face_a": "not a uuid"})

    assert assert_problem(broken, 400, "invalid-json")["errors"][0]["type"] == "json_invalid"
    assert_problem(misfit, 422, "validation-error")
