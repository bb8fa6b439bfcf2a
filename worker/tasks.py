"""Celery tasks, one per JobKind: each takes only the job's id and hands it to `worker.runtime.run_job`; and
`magtune.reindex_chunk`, which takes a chunk id (worker/chunk_runtime.py).

The task's return value is unused (no result backend): the job row holds the status, result and error. A
task never raises for a job that failed, since the failure is recorded on the row; raising is left to what
the row cannot record (the process being killed), which Celery's late acknowledgement turns into a redelivery.
"""

import logging
import os
import signal
import socket

from celery import Task
from celery.signals import worker_process_init

from app.config import get_settings
from app.domain import JobKind
from app.queue import CHUNK_TASK, task_name
from worker.celery_app import celery_app
from worker.chunk_runtime import run_chunks
from worker.runtime import run_job

log = logging.getLogger(__name__)


@worker_process_init.connect
def _leave_sigterm_to_the_parent(**_kwargs: object) -> None:
    """A job's child process ignores SIGTERM, so a SIGTERM sent to the worker's whole process group (systemd's
    default KillMode=control-group, a process manager signalling the group) reaches only the parent, whose
    warm shutdown lets the running job finish instead of killing it part-way and spending an attempt.
    SIGKILL still ends the child, and so does a hard time limit (billiard follows its SIGTERM with SIGKILL);
    a cold shutdown waits for the job."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _worker_name(task: Task) -> str:
    host = getattr(task.request, "hostname", None) or socket.gethostname()
    return f"{host}:{os.getpid()}"


def _run(task: Task, kind: str, job_id: str) -> str | None:
    outcome = run_job(job_id, settings=get_settings(), worker_name=_worker_name(task), expected_kind=kind)
    return outcome.status if outcome is not None else None


def _register(kind: JobKind) -> Task:
    """The task `magtune.<kind>`, which runs only jobs of that kind (anything else fails as wrong-kind)."""

    def run(self: Task, job_id: str) -> str | None:
        return _run(self, kind, job_id)

    run.__name__ = run.__qualname__ = kind.value
    run.__module__ = __name__
    return celery_app.task(name=task_name(kind), bind=True)(run)


TASKS: dict[JobKind, Task] = {kind: _register(kind) for kind in JobKind}

# Module attributes as before (`worker.tasks.validate_model(job_id)`), for callers and tests.
finetune = TASKS[JobKind.FINETUNE]
evaluate = TASKS[JobKind.EVALUATE]
reindex = TASKS[JobKind.REINDEX]
validate_model = TASKS[JobKind.VALIDATE_MODEL]
embed = TASKS[JobKind.EMBED]


@celery_app.task(name=CHUNK_TASK, bind=True)
def reindex_chunk(self: Task, chunk_id: str) -> int:
    """A chunk of a sharded reindex (worker/jobs/reindex_chunks.py): this one, then the job's other queued
    chunks, until none is left; how many this task ran."""
    return run_chunks(chunk_id, settings=get_settings(), worker_name=_worker_name(self))
