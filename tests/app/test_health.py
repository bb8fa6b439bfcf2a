"""Liveness and readiness, against the real PostgreSQL and Redis and against ports where nothing listens."""

from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.app.problems import assert_problem
from tests.services import CLOSED_PORT_BROKER

CLOSED_PORT_DATABASE = "postgresql+psycopg://root@127.0.0.1:1/magtune?connect_timeout=2"


def test_healthz_says_the_process_is_up(client: TestClient) -> None:
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_is_200_when_database_and_broker_answer(client: TestClient) -> None:
    response = client.get("/readyz")

    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "checks": {"database": "ok", "broker": "ok", "blob_store": "ok"},
    }


def test_readyz_names_a_broker_that_is_down(settings: Settings) -> None:
    down = settings.model_copy(update={"broker_url": CLOSED_PORT_BROKER})
    with TestClient(create_app(down, run_sweeper=False)) as client:
        response = client.get("/readyz")

    problem = assert_problem(response, 503, "not-ready")
    assert problem["down"] == ["broker"]
    assert problem["checks"]["database"] == "ok"
    assert problem["detail"] == "down: broker"


def test_readyz_names_a_database_that_is_down(settings: Settings) -> None:
    down = settings.model_copy(update={"database_url": CLOSED_PORT_DATABASE})
    with TestClient(create_app(down, run_sweeper=False)) as client:
        response = client.get("/readyz")

    problem = assert_problem(response, 503, "not-ready")
    assert problem["down"] == ["database"]
    assert problem["checks"]["broker"] == "ok"
    assert problem["detail"] == "down: database"
