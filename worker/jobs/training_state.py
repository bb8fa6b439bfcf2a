"""A fine-tune's trainer state at its last epoch end, saved for a retry to resume from.

Saved whole or not at all (app/durable.py) under the job's id (app/jobs/training_states.py), read back with
`torch.load(weights_only=True)`. A state is only resumed when it was made from the same start: the same
parent checkpoint, hyper-parameters and feedback. Feedback posted between two attempts changes the training
pairs, and epochs trained on other pairs cannot be continued as if they were these, so such a retry starts
over (and says so in the log).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import torch

from app.durable import durable_write
from app.jobs.training_states import state_path
from worker.ml.training import TrainerState
from worker.runtime import JobContext

log = logging.getLogger(__name__)


def fingerprint(*, parent_sha256: str, hyperparameters: dict[str, Any], feedback_sha256: str) -> str:
    """What a state was trained from; a retry resumes only a state with its own fingerprint."""
    start = {"parent": parent_sha256, "hyperparameters": hyperparameters, "feedback": feedback_sha256}
    return hashlib.sha256(json.dumps(start, sort_keys=True).encode()).hexdigest()


def save_state(ctx: JobContext, state: TrainerState, start: str) -> None:
    """Replace the job's saved state; a store that refuses costs only the resume: logged, not fatal."""
    try:
        with durable_write(state_path(ctx.settings, ctx.job.id)) as file:
            torch.save({"fingerprint": start, "state": state.to_dict()}, file)
    except OSError as exc:
        log.warning("job %s: could not save its state after epoch %d: %s", ctx.job.id, state.epoch, exc)


def load_state(ctx: JobContext, start: str) -> TrainerState | None:
    """The state an earlier attempt saved from the same start, or None (nothing saved, another start, or a
    file that does not load)."""
    path = state_path(ctx.settings, ctx.job.id)
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        state = TrainerState.from_dict(saved["state"]) if saved.get("fingerprint") == start else None
    except Exception as exc:  # a torn or foreign file: training from scratch is always correct
        log.warning(
            "job %s: its saved training state does not load (%s); training from scratch", ctx.job.id, exc
        )
        return None
    if state is None:
        log.info(
            "job %s: its saved state was trained on other feedback or settings; training from scratch",
            ctx.job.id,
        )
        return None
    log.info("job %s attempt %d resumes after epoch %d", ctx.job.id, ctx.job.attempt, state.epoch)
    return state
