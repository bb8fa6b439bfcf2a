"""The auto fine-tune policy: exactly one fine-tune once enough new training labels arrived, none before and
none while one is queued or running, with feedback posted and sweeps run concurrently, on PostgreSQL and on
the embedded SQLite."""

import itertools
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.config import Settings
from app.db import session_scope
from app.jobs.sweeper import sweep_once
from app.main import create_app
from app.migrate import upgrade_database
from app.tables import Job, utcnow
from tests.app.factories import activate_directly, insert_face, insert_model
from tests.keys import bearer, issue_test_key

AFTER = 6
PARAMS = {"epochs": 1, "learning_rate": 3e-4, "freeze_stem": True}


@pytest.fixture(params=["postgresql", "sqlite"])
def policy_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    update = {"auto_finetune_after_labels": AFTER, "auto_finetune_params": PARAMS}
    if request.param == "postgresql":
        return request.getfixturevalue("settings").model_copy(update=update)
    settings = Settings(data_dir=tmp_path / "embedded", broker_url="memory://", **update)
    upgrade_database(settings.database_url)
    return settings


@pytest.fixture
def clients(policy_settings: Settings) -> Iterator[list[TestClient]]:
    """Two api apps on the same database, as two api processes would be."""
    headers = bearer(issue_test_key(policy_settings.database_url))
    apps = [TestClient(create_app(policy_settings, run_sweeper=False), headers=headers) for _ in range(2)]
    yield [app.__enter__() for app in apps]
    for app in apps:
        app.__exit__(None, None, None)


def _post_concurrently(clients: list[TestClient], pairs: list[tuple[uuid.UUID, uuid.UUID, int]]) -> None:
    def post(index: int) -> int:
        a, b, label = pairs[index]
        body = {"face_a": str(a), "face_b": str(b), "label": label}
        return clients[index % len(clients)].post("/v1/feedback", json=body).status_code

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert set(pool.map(post, range(len(pairs)))) == {201}


def _sweep_concurrently(settings: Settings, sweepers: int = 4) -> list[uuid.UUID]:
    """Several api processes' sweepers at once; the fine-tunes they queued between them."""
    with ThreadPoolExecutor(max_workers=sweepers) as pool:
        reports = list(pool.map(lambda _: sweep_once(settings), range(sweepers)))
    return [job_id for report in reports for job_id in report.auto_finetune]


def _finetunes(settings: Settings) -> list[Job]:
    with session_scope(settings.database_url) as session:
        jobs = session.scalars(select(Job).where(Job.kind == "finetune").order_by(Job.created_at)).all()
        session.expunge_all()
        return list(jobs)


def _set_status(settings: Settings, job_id: uuid.UUID, status: str) -> None:
    finished = utcnow() if status in {"succeeded", "failed", "cancelled"} else None
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(status=status, finished_at=finished))


def test_one_fine_tune_is_queued_once_enough_training_labels_arrived(
    policy_settings: Settings, clients: list[TestClient]
) -> None:
    settings = policy_settings
    model = insert_model(settings)
    activate_directly(settings, model)
    train = [insert_face(settings, split="train") for _ in range(8)]
    test = [insert_face(settings, split="test") for _ in range(3)]
    pairs: Callable[[], Iterator[tuple[uuid.UUID, uuid.UUID]]] = lambda: itertools.combinations(train, 2)  # noqa: E731
    unused = iter(pairs())
    take = lambda n: [(a, b, (i % 2)) for i, (a, b) in zip(range(n), unused, strict=False)]  # noqa: E731

    # not training labels: test pairs, a pair across splits, and a train pair naming a regression face
    regression_face = insert_face(settings, split="train")
    other = insert_face(settings, split="train")
    _post_concurrently(clients, [(test[0], test[1], 1), (test[0], test[2], 0)])
    body = {"face_a": str(regression_face), "face_b": str(other), "label": 0, "split": "regression"}
    assert clients[0].post("/v1/feedback", json=body).status_code == 201
    counted = take(AFTER - 1)
    _post_concurrently(clients, [(regression_face, train[0], 0), *counted])
    # Both faces hold labels by now, so neither may move into the other's split: the pair stays across.
    across = {"face_a": str(train[0]), "face_b": str(test[0]), "label": 0}
    assert clients[1].post("/v1/feedback", json=across).json()["split"] == "cross"
    assert _sweep_concurrently(settings) == [] and _finetunes(settings) == [], "one label short: nothing"

    counted += take(1)
    _post_concurrently(clients, counted[-1:])
    same = sum(label for _, _, label in counted)
    queued = _sweep_concurrently(settings)
    (job,) = _finetunes(settings)
    assert queued == [job.id], "several sweepers at once queue exactly one"
    assert job.status == "queued" and job.params["base_model"] == str(model)
    assert {key: job.params[key] for key in PARAMS} == PARAMS
    trigger = job.trigger
    assert trigger["by"] == "auto-finetune policy"
    assert trigger["labels"] | {"since": None} == {
        "total": AFTER,
        "same": same,
        "different": AFTER - same,
        "since": None,
        "since_job_id": None,
    }
    assert trigger["settings"] == {"auto_finetune_after_labels": AFTER, "auto_finetune_params": PARAMS}
    assert str(AFTER) in trigger["reason"]
    shown = clients[1].get(f"/v1/jobs/{job.id}").json()
    assert shown["trigger"] == trigger

    # more labels while it is queued, then running: nothing more
    _post_concurrently(clients, take(AFTER))
    assert _sweep_concurrently(settings) == []
    _set_status(settings, job.id, "running")
    assert _sweep_concurrently(settings) == [] and len(_finetunes(settings)) == 1

    # once it has ended, the labels that arrived after it was created are due: exactly one more
    _set_status(settings, job.id, "succeeded")
    queued = _sweep_concurrently(settings)
    first, second = _finetunes(settings)
    assert first.id == job.id and queued == [second.id]
    assert second.trigger["labels"]["since_job_id"] == str(job.id)
    assert second.trigger["labels"]["total"] == AFTER

    # and then nothing new has arrived since the newest fine-tune job
    _set_status(settings, second.id, "failed")
    assert _sweep_concurrently(settings) == [] and len(_finetunes(settings)) == 2


def test_the_policy_is_off_by_default_and_waits_for_an_active_model(
    settings: Settings, client: TestClient
) -> None:
    assert Settings().auto_finetune_after_labels == 0
    train = [insert_face(settings, split="train") for _ in range(4)]
    for a, b in itertools.combinations(train, 2):
        body = {"face_a": str(a), "face_b": str(b), "label": 0}
        assert client.post("/v1/feedback", json=body).status_code == 201
    assert sweep_once(settings).auto_finetune == [] and _finetunes(settings) == []
    due = settings.model_copy(update={"auto_finetune_after_labels": 3})
    assert sweep_once(due).auto_finetune == [], "no active model: nothing to fine-tune"
    activate_directly(settings, insert_model(settings))
    assert len(sweep_once(due).auto_finetune) == 1


@pytest.mark.parametrize(
    "params", [{"epochs": 0}, {"base_model": str(uuid.UUID(int=1))}, {"unknown": 1}, {"epochs": "3"}]
)
def test_bad_policy_params_are_refused_when_the_settings_load(params: dict) -> None:
    with pytest.raises(ValueError, match="auto_finetune_params"):
        Settings(auto_finetune_params=params)
