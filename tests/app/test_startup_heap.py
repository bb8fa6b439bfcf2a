"""The api moves its start-up objects out of the collector's sight while it runs, and gives them back."""

import gc

from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app


def test_start_up_objects_are_frozen_while_the_app_runs_and_thawed_after(settings: Settings) -> None:
    gc.unfreeze()  # whatever an earlier test left
    app = create_app(settings, run_sweeper=False)

    with TestClient(app) as client:
        frozen = gc.get_freeze_count()
        assert client.get("/healthz").status_code == 200

    assert frozen > 10_000  # the app, its routes, schemas and libraries
    assert gc.get_freeze_count() == 0  # nothing left the collector cannot reach once the app is gone
