"""Every job kind has a handler module and a Celery task, both taken from the one JobKind enum."""

import importlib

import pytest

import worker.tasks
from app.domain import JobKind
from app.queue import task_name
from worker.celery_app import celery_app
from worker.jobs import HANDLER_MODULES, KINDS, handler_for


def test_the_handler_table_names_every_kind() -> None:
    assert set(HANDLER_MODULES) == set(JobKind)
    assert tuple(kind.value for kind in JobKind) == KINDS


@pytest.mark.parametrize("kind", list(JobKind))
def test_each_handler_module_has_a_run_function(kind: JobKind) -> None:
    module = importlib.import_module(HANDLER_MODULES[kind])

    assert callable(module.run)
    assert handler_for(kind.value) is module.run


def test_an_unknown_kind_has_no_handler() -> None:
    with pytest.raises(ValueError, match="no handler for job kind 'retrain'"):
        handler_for("retrain")


@pytest.mark.parametrize("kind", list(JobKind))
def test_each_kind_has_its_celery_task(kind: JobKind) -> None:
    task = worker.tasks.TASKS[kind]

    assert task.name == task_name(kind) == f"magtune.{kind.value}"
    assert task.name in celery_app.tasks
    assert getattr(worker.tasks, kind.value) is task
