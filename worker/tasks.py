"""Celery tasks, one per job kind: each takes only the job's id and hands it to `worker.runtime.run_job`.

The task's return value is unused (no result backend): the job row holds the status, result and error. A
task never raises for a job that failed, since the failure is recorded on the row; raising is left to what
the row cannot record (the process being killed), which Celery's late acknowledgement turns into a redelivery.
"""

import logging
import os
import socket

from celery import Task

from app.config import get_settings
from app.queue import task_name
from worker.celery_app import celery_app
from worker.runtime import run_job

log = logging.getLogger(__name__)


def _worker_name(task: Task) -> str:
    host = getattr(task.request, "hostname", None) or socket.gethostname()
    return f"{host}:{os.getpid()}"


def _run(task: Task, kind: str, job_id: str) -> str | None:
    outcome = run_job(job_id, settings=get_settings(), worker_name=_worker_name(task), expected_kind=kind)
    return outcome.status if outcome is not None else None


@celery_app.task(name=task_name("finetune"), bind=True)
def finetune(self: Task, job_id: str) -> str | None:
    return _run(self, "finetune", job_id)


@celery_app.task(name=task_name("evaluate"), bind=True)
def evaluate(self: Task, job_id: str) -> str | None:
    return _run(self, "evaluate", job_id)


@celery_app.task(name=task_name("reindex"), bind=True)
def reindex(self: Task, job_id: str) -> str | None:
    return _run(self, "reindex", job_id)


@celery_app.task(name=task_name("validate_model"), bind=True)
def validate_model(self: Task, job_id: str) -> str | None:
    return _run(self, "validate_model", job_id)
