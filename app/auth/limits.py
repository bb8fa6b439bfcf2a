"""Abuse limits per key: a write rate (token bucket, in this api process) and a cap on unfinished jobs.

The rate is per api process: with N api processes a key may write up to N times the rate. It is there to
stop a runaway client, not to meter one precisely; the job cap is read from the database, so it holds across
processes.
"""

import threading
import time

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.auth.keys import Caller
from app.config import Settings
from app.domain import JobStatus
from app.problems import Problem
from app.tables import Job

MAX_TRACKED_KEYS = 100_000  # buckets kept before the full ones are dropped (a full bucket is the default)


class WriteLimiter:
    """One token bucket per key: `rate_per_s` tokens a second, at most `burst` saved up."""

    def __init__(self, rate_per_s: float, burst: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = max(burst, 1.0)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key_id: str) -> float:
        """Take one token: 0 when granted, else the seconds until one is available."""
        if self.rate_per_s <= 0:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens, then = self._buckets.get(key_id, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate_per_s)
            if tokens < 1.0:
                self._buckets[key_id] = (tokens, now)
                return (1.0 - tokens) / self.rate_per_s
            if len(self._buckets) >= MAX_TRACKED_KEYS:
                self._buckets = {k: v for k, v in self._buckets.items() if v[0] < self.burst}
            self._buckets[key_id] = (tokens - 1.0, now)
            return 0.0


def check_job_cap(session: Session, settings: Settings, caller: Caller | None) -> None:
    """429 when the key has `max_active_jobs_per_key` jobs queued or running already."""
    if caller is None or settings.max_active_jobs_per_key <= 0:
        return
    active = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.created_by == caller.key_id, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
    )
    if active is not None and active >= settings.max_active_jobs_per_key:
        raise Problem(
            429,
            "too-many-jobs",
            "Too many unfinished jobs",
            f"key {caller.key_id} has {active} jobs queued or running (at most "
            f"{settings.max_active_jobs_per_key}); wait for one to finish or cancel one",
            headers={"Retry-After": "60"},
            active_jobs=active,
        )
