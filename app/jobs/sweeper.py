"""Keeps the job table honest when messages or workers are lost.

Every api process may run a sweeper at once: each change is one conditional UPDATE that only the first
sweeper to reach a row can make, and a job is re-sent only by the sweeper whose update claimed it (the
update stamps `enqueued_at`, so the others no longer see it as unsent), and only when the broker no longer
holds its message (app/broker_inventory.py; a job merely waiting behind a busy worker is not re-sent). A job
sent twice would be harmless anyway: the worker's claim (queued → running) succeeds once.
"""

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import ColumnElement, and_, exists, func, null, or_, update
from sqlalchemy.orm import Session

from app.broker_inventory import held_job_ids
from app.config import Settings
from app.db import session_scope
from app.domain import JobStatus
from app.erasures import finish_pending_erasures
from app.jobs import auto_finetune
from app.jobs.training_states import discard_states_of_ended_jobs
from app.queue import queue_for, send_chunk, send_job
from app.tables import Job, JobChunk

log = logging.getLogger(__name__)

# A job created this recently may still be on its way to the broker from the request that created it.
NEVER_SENT_GRACE_S = 10.0


@dataclass
class SweepReport:
    resent: list[uuid.UUID] = field(default_factory=list)
    still_in_broker: list[uuid.UUID] = field(default_factory=list)  # looked lost, but the broker has them
    requeued: list[uuid.UUID] = field(default_factory=list)
    failed: list[uuid.UUID] = field(default_factory=list)
    cancelled: list[uuid.UUID] = field(default_factory=list)
    send_failures: list[uuid.UUID] = field(default_factory=list)
    auto_finetune: list[uuid.UUID] = field(default_factory=list)  # the fine-tune the policy queued, if any
    chunks_requeued: list[uuid.UUID] = field(default_factory=list)  # chunks of a sharded reindex
    chunks_failed: list[uuid.UUID] = field(default_factory=list)
    erased: int = 0
    erasures_pending: int = 0
    training_states_removed: int = 0  # left by jobs that ended without their worker


def _claim_lost_messages(session: Session, settings: Settings, now: datetime) -> list[tuple[uuid.UUID, str]]:
    stale_send = now - timedelta(seconds=settings.job_requeue_after_s)
    never_sent = now - timedelta(seconds=min(NEVER_SENT_GRACE_S, settings.job_requeue_after_s))
    rows = session.execute(
        update(Job)
        .where(
            Job.status == JobStatus.QUEUED,
            or_(
                Job.enqueued_at < stale_send,
                and_(Job.enqueued_at.is_(None), Job.created_at < never_sent),
            ),
        )
        .values(enqueued_at=now)
        .returning(Job.id, Job.kind)
        .execution_options(synchronize_session=False)
    ).all()
    return [(row.id, row.kind) for row in rows]


def _stale_running(settings: Settings, now: datetime) -> ColumnElement[bool]:
    cutoff = now - timedelta(seconds=settings.job_heartbeat_timeout_s)
    return and_(
        Job.status == JobStatus.RUNNING,
        func.coalesce(Job.heartbeat_at, Job.started_at, Job.created_at) < cutoff,
    )


def _recover_lost_workers(
    session: Session, settings: Settings, now: datetime, report: SweepReport
) -> list[tuple[uuid.UUID, str]]:
    stale = _stale_running(settings, now)
    cancelled = session.execute(
        update(Job)
        .where(stale, Job.cancel_requested.is_(True))
        .values(status=JobStatus.CANCELLED, finished_at=now)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).scalars()
    report.cancelled.extend(cancelled)
    failed = session.execute(
        update(Job)
        .where(stale, Job.attempts >= Job.max_attempts)
        .values(
            status=JobStatus.FAILED,
            finished_at=now,
            error={
                "type": "worker-lost",
                "title": "Worker lost",
                "detail": "the worker stopped sending heartbeats and the job has used all its attempts",
            },
        )
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).scalars()
    report.failed.extend(failed)
    requeued = session.execute(
        update(Job)
        .where(stale, Job.attempts < Job.max_attempts)
        .values(status=JobStatus.QUEUED, worker=None, heartbeat_at=None, progress=null(), enqueued_at=now)
        .returning(Job.id, Job.kind)
        .execution_options(synchronize_session=False)
    ).all()
    report.requeued.extend(row.id for row in requeued)
    return [(row.id, row.kind) for row in requeued]


def _recover_lost_chunks(session: Session, settings: Settings, now: datetime, report: SweepReport) -> None:
    """A running chunk whose heartbeat stopped is handed back alone while it has attempts left, else failed
    (which fails its job: the job's worker sees it). Requeued chunks are re-sent; the job's worker would
    take them anyway. Chunks of a job that has ended, left queued or by a dead worker, are closed."""
    cutoff = now - timedelta(seconds=settings.job_heartbeat_timeout_s)
    stale = and_(
        JobChunk.status == JobStatus.RUNNING,
        func.coalesce(JobChunk.heartbeat_at, JobChunk.started_at, JobChunk.created_at) < cutoff,
    )
    job_open = exists().where(
        Job.id == JobChunk.job_id, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING])
    )
    session.execute(
        update(JobChunk)
        .where(or_(stale, JobChunk.status == JobStatus.QUEUED), ~job_open)
        .values(status=JobStatus.CANCELLED, finished_at=now)
        .execution_options(synchronize_session=False)
    )
    failed = session.execute(
        update(JobChunk)
        .where(stale, JobChunk.attempts >= JobChunk.max_attempts)
        .values(
            status=JobStatus.FAILED,
            finished_at=now,
            error={
                "type": "worker-lost",
                "title": "Worker lost",
                "detail": "its worker stopped sending heartbeats and the chunk has used all its attempts",
            },
        )
        .returning(JobChunk.id)
        .execution_options(synchronize_session=False)
    ).scalars()
    report.chunks_failed.extend(failed)
    requeued = session.execute(
        update(JobChunk)
        .where(stale, JobChunk.attempts < JobChunk.max_attempts)
        .values(status=JobStatus.QUEUED, worker=None, heartbeat_at=None)
        .returning(JobChunk.id)
        .execution_options(synchronize_session=False)
    ).scalars()
    report.chunks_requeued.extend(requeued)


def sweep_once(settings: Settings, now: datetime | None = None) -> SweepReport:
    """One pass: recover jobs of dead workers, re-send queued jobs whose message may be lost, finish the
    erasures of files the blob store refused to remove (app/erasures.py), remove the training states of
    ended jobs (app/jobs/training_states.py), then apply the auto fine-tune policy
    (app/jobs/auto_finetune.py; off unless `auto_finetune_after_labels` is set)."""
    now = now or datetime.now(UTC)
    report = SweepReport()
    with session_scope(settings.database_url) as session:
        to_send = _recover_lost_workers(session, settings, now, report)
    with session_scope(settings.database_url) as session:
        _recover_lost_chunks(session, settings, now, report)
    for chunk_id in report.chunks_requeued:
        try:
            send_chunk(settings, chunk_id)
        except Exception:
            log.warning("could not re-send chunk %s; its job's worker takes it", chunk_id)
    with session_scope(settings.database_url) as session:
        resent = _claim_lost_messages(session, settings, now)
    to_send, resent = _not_held_by_broker(settings, to_send, resent, now, report)
    report.resent.extend(job_id for job_id, _ in resent)
    for job_id, kind in [*to_send, *resent]:
        try:
            send_job(settings, job_id, kind)
        except Exception:
            log.warning(
                "could not re-send job %s (%s); the next sweep tries again", job_id, kind, exc_info=True
            )
            report.send_failures.append(job_id)
            _release_send_claim(settings, job_id, now)
    report.erased, report.erasures_pending = finish_pending_erasures(settings)
    report.training_states_removed = discard_states_of_ended_jobs(settings)
    try:
        queued = auto_finetune.queue_if_due(settings)
    except Exception:
        log.exception("auto fine-tune policy failed; the next sweep tries again")
    else:
        report.auto_finetune.extend([queued] if queued is not None else [])
    chunks = (report.chunks_requeued, report.chunks_failed)
    if any((report.requeued, report.failed, report.cancelled, report.resent, report.erased, *chunks)):
        log.info(
            "sweep: %d re-sent, %d requeued, %d failed (worker lost), %d cancelled, %d files erased, "
            "%d chunks requeued, %d chunks failed",
            len(report.resent),
            len(report.requeued),
            len(report.failed),
            len(report.cancelled),
            report.erased,
            len(report.chunks_requeued),
            len(report.chunks_failed),
        )
    return report


def _not_held_by_broker(
    settings: Settings,
    requeued: list[tuple[uuid.UUID, str]],
    unsent: list[tuple[uuid.UUID, str]],
    now: datetime,
    report: SweepReport,
) -> tuple[list[tuple[uuid.UUID, str]], list[tuple[uuid.UUID, str]]]:
    """Leave out the jobs whose message the broker still holds (app/broker_inventory.py): a queued job
    waiting behind a busy worker is not lost, and a duplicate would cost a worker process later. Its stamp
    stays, so it is looked at again `job_requeue_after_s` later. A job requeued from a dead worker counts
    only a waiting message (one Celery put back): the dead worker's own delivery is never acknowledged."""
    jobs = [*requeued, *unsent]
    if not jobs:
        return requeued, unsent
    since = (now - timedelta(seconds=settings.job_requeue_after_s)).timestamp()
    held = held_job_ids(settings, {queue_for(settings, kind) for _, kind in jobs}, delivered_since=since)
    if held is None:
        return requeued, unsent
    in_broker = [job for job in unsent if str(job[0]) in held.waiting | held.delivered]
    in_broker += [job for job in requeued if str(job[0]) in held.waiting]
    report.still_in_broker.extend(job_id for job_id, _ in in_broker)
    return [job for job in requeued if job not in in_broker], [job for job in unsent if job not in in_broker]


def _release_send_claim(settings: Settings, job_id: uuid.UUID, claimed_at: datetime) -> None:
    """Forget our send stamp when the broker was down, so the next sweep tries again."""
    with session_scope(settings.database_url) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.QUEUED, Job.enqueued_at == claimed_at)
            .values(enqueued_at=None)
            .execution_options(synchronize_session=False)
        )


def start_background_sweeper(settings: Settings) -> Callable[[], None]:
    """Sweep every `sweep_interval_s` on a daemon thread; returns a function that stops it."""
    stopping = threading.Event()

    def run() -> None:
        while True:
            try:
                sweep_once(settings)
            except Exception:
                log.exception("job sweep failed; trying again in %.0f s", settings.sweep_interval_s)
            if stopping.wait(settings.sweep_interval_s):
                return

    thread = threading.Thread(target=run, name="magtune-job-sweeper", daemon=True)
    thread.start()

    def stop() -> None:
        stopping.set()
        thread.join(timeout=settings.sweep_interval_s + 5)

    return stop
