"""Every operation of the app, read from its own route table, against every kind of key.

A route added anywhere joins this matrix without anyone editing it; a route that declares no scope fails
`test_every_route_declares_exactly_one_access`.
"""

import re
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient
from httpx import Response

from app.auth.dependencies import ANY_KEY, OPEN, OPEN_PATHS
from app.auth.routes import Operation, operations, other_routes
from app.auth.scopes import ALL_SCOPES, Scope
from app.config import Settings
from app.main import create_app
from tests.app.problems import assert_problem
from tests.keys import bearer, issue_test_key


def _app_for_collection() -> FastAPI:
    return create_app(Settings(database_url="sqlite:////nonexistent/unused.db"), run_sweeper=False)


OPERATIONS = operations(_app_for_collection())
SECURED = [op for op in OPERATIONS if op.access not in ((OPEN,), (ANY_KEY,)) and len(op.access) == 1]
OPEN_OPERATIONS = [op for op in OPERATIONS if op.access == (OPEN,)]
ANY_KEY_OPERATIONS = [op for op in OPERATIONS if op.access == (ANY_KEY,)]


def _id(op: Operation) -> str:
    return f"{op.method} {op.path}"


def _url(path: str) -> str:
    """Every path parameter filled with a well-formed id that names nothing."""
    return re.sub(r"\{[^}]+\}", str(uuid.uuid4()), path)


def _call(client: TestClient, op: Operation, key: str | None) -> Response:
    headers = bearer(key) if key is not None else {}
    return client.request(op.method, _url(op.path), headers=headers)


def test_every_route_declares_exactly_one_access() -> None:
    app = _app_for_collection()
    undeclared = [_id(op) for op in operations(app) if len(op.access) != 1]
    assert undeclared == [], "declare requires(Scope.X) or open_route() on these routes"
    assert sorted(other_routes(app)) == sorted(OPEN_PATHS)


def test_the_only_open_operations_are_health_docs_and_the_console_page() -> None:
    assert sorted(_id(op) for op in OPEN_OPERATIONS) == [
        "GET /console",
        "GET /console/{name}",
        "GET /docs",
        "GET /healthz",
        "GET /readyz",
        "GET /redoc",
    ]


def test_every_scope_guards_some_operation_but_review_which_waits_for_its_queue() -> None:
    used = {op.access[0] for op in SECURED}
    assert set(ALL_SCOPES) - used <= {Scope.REVIEW}


@pytest.mark.parametrize("op", SECURED, ids=_id)
def test_an_operation_answers_each_kind_of_key(
    op: Operation, anonymous_client: TestClient, settings: Settings
) -> None:
    (needed,) = op.access
    url = settings.database_url
    others = [scope for scope in ALL_SCOPES if scope != needed]

    missing = _call(anonymous_client, op, None)
    body = assert_problem(missing, 401, "unauthenticated")
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert "no key" in body["detail"]

    revoked = _call(anonymous_client, op, issue_test_key(url, [needed], revoked=True))
    assert "revoked" in assert_problem(revoked, 401, "unauthenticated")["detail"]

    expired = _call(anonymous_client, op, issue_test_key(url, [needed], expires_in=timedelta(seconds=-1)))
    assert "expired" in assert_problem(expired, 401, "unauthenticated")["detail"]

    wrong = _call(anonymous_client, op, issue_test_key(url, others))
    assert assert_problem(wrong, 403, "insufficient-scope")["scope"] == needed.value

    right = _call(anonymous_client, op, issue_test_key(url, [needed]))
    assert right.status_code not in (401, 403), right.text


def test_the_only_any_key_operation_is_a_key_reading_itself() -> None:
    assert [_id(op) for op in ANY_KEY_OPERATIONS] == ["GET /v1/keys/me"]


@pytest.mark.parametrize("op", ANY_KEY_OPERATIONS, ids=_id)
def test_an_any_key_operation_needs_a_valid_key_of_any_scope(
    op: Operation, anonymous_client: TestClient, settings: Settings
) -> None:
    url = settings.database_url
    assert_problem(_call(anonymous_client, op, None), 401, "unauthenticated")
    revoked = _call(anonymous_client, op, issue_test_key(url, [Scope.JOBS_READ], revoked=True))
    assert "revoked" in assert_problem(revoked, 401, "unauthenticated")["detail"]
    for scope in ALL_SCOPES:
        assert _call(anonymous_client, op, issue_test_key(url, [scope])).status_code == 200, scope


@pytest.mark.parametrize("op", OPEN_OPERATIONS, ids=_id)
def test_an_open_operation_needs_no_key(op: Operation, anonymous_client: TestClient) -> None:
    assert _call(anonymous_client, op, None).status_code not in (401, 403)


def test_the_openapi_document_names_the_bearer_scheme_and_each_operations_scope(
    anonymous_client: TestClient,
) -> None:
    document = anonymous_client.get("/openapi.json")

    assert document.status_code == 200
    schema = document.json()
    assert schema["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "mt_<id>_<secret>",
        "description": schema["components"]["securitySchemes"]["apiKey"]["description"],
    }
    for op in SECURED + OPEN_OPERATIONS + ANY_KEY_OPERATIONS:
        if not op.include_in_schema:
            continue
        operation = schema["paths"][op.path][op.method.lower()]
        if op.access == (OPEN,):
            assert operation["security"] == [], _id(op)
        elif op.access == (ANY_KEY,):
            assert operation["security"] == [{"apiKey": []}], _id(op)
            assert "x-required-scope" not in operation and "401" in operation["responses"]
        else:
            assert operation["security"] == [{"apiKey": [op.access[0].value]}], _id(op)
            assert operation["x-required-scope"] == op.access[0].value
            assert {"401", "403"} <= set(operation["responses"]), _id(op)


def test_a_route_that_declares_nothing_needs_admin(settings: Settings, anonymous_client: TestClient) -> None:
    """The door stays closed when a declaration is forgotten; the route table shows it as undeclared."""
    app = create_app(settings, run_sweeper=False)
    stray = APIRouter()

    @stray.get("/stray")
    def stray_route() -> dict[str, str]:
        return {"status": "reached"}

    app.include_router(stray, prefix="/v1")
    assert [op.access for op in operations(app) if op.path == "/v1/stray"] == [()]
    everything_but_admin = [scope for scope in ALL_SCOPES if scope != Scope.ADMIN]
    with TestClient(app) as client:
        assert_problem(client.get("/v1/stray"), 401, "unauthenticated")
        refused = client.get(
            "/v1/stray", headers=bearer(issue_test_key(settings.database_url, everything_but_admin))
        )
        assert assert_problem(refused, 403, "insufficient-scope")["scope"] == "admin"
        allowed = client.get(
            "/v1/stray", headers=bearer(issue_test_key(settings.database_url, [Scope.ADMIN]))
        )
        assert allowed.json() == {"status": "reached"}


def test_docs_can_be_closed(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'unused.db'}", docs_open=False
    )
    with TestClient(create_app(settings, run_sweeper=False)) as client:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert client.get(path).status_code == 404, path
        assert client.get("/healthz").status_code == 200
