"""The auto fine-tune policy: once enough new training labels have arrived, queue one fine-tune.

Off by default (`auto_finetune_after_labels` 0). When it is N > 0, a fine-tune of the active model with
`auto_finetune_params` is queued once N usable training labels (pairs in split `train` that name no
regression face, the pairs a fine-tune trains on) were created after the newest fine-tune job, whatever its
outcome, and no fine-tune is queued or running. The job records in `trigger` the settings, the reason and
the label counts.

It runs in the api's sweeper, not after each feedback commit: labels arrive through single posts, batches
and `magtune import` alike, and a count query per post would cost the ingest path; a fine-tune that takes
minutes can wait `sweep_interval_s` to be queued. The sweeper also catches the labels that arrived while
the previous fine-tune ran, which no post after its end might otherwise trigger.

Every api process sweeps, so the check and the insert are serialised by the database: a transaction-scoped
advisory lock on PostgreSQL, `BEGIN IMMEDIATE` (the write lock) on SQLite. A second sweeper waits, then sees
the first one's job as queued (or running) and adds nothing. The coalesced insert (one queued job per key,
a unique index) guards the same once more.
"""

import hashlib
import logging
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import session_scope
from app.domain import FeedbackSplit, JobKind, JobStatus
from app.jobs.params import FinetuneParams
from app.jobs.submission import add_coalesced_job
from app.models import service as models_service
from app.tables import FeedbackPair, Job

log = logging.getLogger(__name__)

COALESCE_KEY = "auto-finetune"
ACTOR = "auto-finetune policy"
_LOCK_ID = int.from_bytes(hashlib.sha256(b"magtune:auto-finetune").digest()[:8], "big", signed=True)
ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)


def _serialise(session: Session) -> None:
    """Hold the database's lock for this decision until the transaction ends (the first statement)."""
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
    else:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def new_training_labels(session: Session, since: datetime | None) -> dict[str, int]:
    """Usable train pairs created after `since` (all when None): {"total", "same", "different"}."""
    regression = FeedbackSplit.REGRESSION
    regression_faces = (
        select(FeedbackPair.face_a)
        .where(FeedbackPair.split == regression)
        .union(select(FeedbackPair.face_b).where(FeedbackPair.split == regression))
    )
    statement = (
        select(FeedbackPair.label, func.count())
        .where(
            FeedbackPair.split == FeedbackSplit.TRAIN,
            FeedbackPair.face_a.not_in(regression_faces),
            FeedbackPair.face_b.not_in(regression_faces),
        )
        .group_by(FeedbackPair.label)
    )
    if since is not None:
        statement = statement.where(FeedbackPair.created_at > since)
    by_label = {int(label): int(n) for label, n in session.execute(statement)}
    same, different = by_label.get(1, 0), by_label.get(0, 0)
    return {"total": same + different, "same": same, "different": different}


def queue_if_due(settings: Settings) -> uuid.UUID | None:
    """One look at the policy: the id of the fine-tune it queued (sent after commit), or None."""
    wanted = settings.auto_finetune_after_labels
    if wanted <= 0:
        return None
    with session_scope(settings.database_url) as session:
        return _queue_if_due(session, settings, wanted)


def _queue_if_due(session: Session, settings: Settings, wanted: int) -> uuid.UUID | None:
    _serialise(session)
    finetunes = select(Job).where(Job.kind == JobKind.FINETUNE)
    active = session.scalar(
        select(func.count()).select_from(finetunes.where(Job.status.in_(ACTIVE)).subquery())
    )
    if active:
        return None
    last = session.execute(
        select(Job.id, Job.created_at)
        .where(Job.kind == JobKind.FINETUNE)
        .order_by(Job.created_at.desc(), Job.id.desc())
        .limit(1)
    ).first()
    since = last.created_at if last is not None else None
    labels = new_training_labels(session, since)
    if labels["total"] < wanted:
        return None
    base = models_service.active_model_id(session)
    if base is None:
        log.info("auto fine-tune due (%d new training labels) but no model is active", labels["total"])
        return None
    params = FinetuneParams.model_validate(settings.auto_finetune_params | {"base_model": base})
    job_id = add_coalesced_job(
        session=session, settings=settings, kind=JobKind.FINETUNE, params=params, key=COALESCE_KEY
    )
    if job_id is None:
        return None
    after = f"since fine-tune job {last.id} was created" if last is not None else "and no fine-tune yet"
    trigger: dict[str, Any] = {
        "by": ACTOR,
        "reason": f"{labels['total']} new usable training labels {after} (at least {wanted})",
        "labels": {
            **labels,
            "since": since.isoformat() if since is not None else None,
            "since_job_id": str(last.id) if last is not None else None,
        },
        "settings": {
            "auto_finetune_after_labels": wanted,
            "auto_finetune_params": dict(settings.auto_finetune_params),
        },
    }
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(trigger=trigger)
        .execution_options(synchronize_session=False)
    )
    log.info("auto fine-tune queued as job %s: %s", job_id, trigger["reason"])
    return job_id
