"""Where a running job keeps the state it resumes from on a retry, and when that state is removed.

A fine-tune writes its trainer state at the end of every epoch (worker/jobs/training_state.py) to
`<blob_dir>/training-states/<job id>`: keyed by the job, not by content, since each epoch replaces the
last. The state is only worth keeping while the job can still be retried, so the worker removes it when the
job ends, and the sweeper removes whatever a job left behind that ended without its worker (attempts spent
after a worker died, a cancel noticed by the sweeper). Torch-free: the api's sweeper uses it.
"""

import logging
import uuid
from pathlib import Path

from sqlalchemy import select

from app.config import Settings
from app.db import session_scope
from app.domain import JobStatus
from app.tables import Job

log = logging.getLogger(__name__)

DIRECTORY = "training-states"


def state_directory(settings: Settings) -> Path:
    return settings.blob_dir / DIRECTORY


def state_path(settings: Settings, job_id: uuid.UUID) -> Path:
    return state_directory(settings) / str(job_id)


def discard_state(settings: Settings, job_id: uuid.UUID) -> bool:
    """Remove a job's state; False when there was none or the store refused (the sweeper tries again)."""
    try:
        state_path(settings, job_id).unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("could not remove the training state of job %s: %s", job_id, exc)
        return False
    return True


def _job_ids(directory: Path) -> list[uuid.UUID]:
    ids = []
    for entry in directory.iterdir():
        try:
            ids.append(uuid.UUID(entry.name))
        except ValueError:
            continue  # a temp file being written, or not ours
    return ids


def discard_states_of_ended_jobs(settings: Settings) -> int:
    """The sweeper's pass: remove the states of jobs that are no longer queued or running (or are gone)."""
    directory = state_directory(settings)
    if not directory.is_dir():
        return 0
    ids = _job_ids(directory)
    if not ids:
        return 0
    open_statuses = (JobStatus.QUEUED, JobStatus.RUNNING)
    with session_scope(settings.database_url) as session:
        alive = set(session.scalars(select(Job.id).where(Job.id.in_(ids), Job.status.in_(open_statuses))))
    return sum(discard_state(settings, job_id) for job_id in ids if job_id not in alive)
