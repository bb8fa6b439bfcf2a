"""A job's progress as a server-sent event stream, read by polling its row with a short session per poll.

Event ids are the row's `revision` (bumped by every update of the row), so they increase. Each event carries
the job's whole state (status, attempts, progress, result, error), never a delta: an event is sent when that
state differs from the last one sent on this stream. The row holds only the latest progress, so two writes
within one poll interval reach the stream as one event (a fine-tune's result keeps its per-epoch history).

A stream that resumes with `Last-Event-ID: n` starts with the current state only when the row was updated
after revision n (an update that changed nothing the event shows, such as a heartbeat, may repeat the last
event once: clients treat events as idempotent). The stream ends with an `end` event once the job is
finished, or quietly after `job_events_max_lifetime_s` (the client resumes); a comment line goes out every
`job_events_heartbeat_s` while nothing changes.

No database connection is held between polls, and the waits are `await`s, so an open stream holds neither a
connection nor a threadpool thread; the streams open at once in one api process are bounded
(`job_events_max_streams`, 503 `too-many-streams` beyond).
"""

import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
from sqlalchemy import select
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.config import Settings
from app.db import get_session_factory
from app.domain import JobStatus
from app.problems import Problem
from app.tables import Job

FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
RETRY_MS = 2000  # how long an EventSource waits before it reconnects


@dataclass(frozen=True)
class Snapshot:
    revision: int
    state: dict[str, Any]

    @property
    def finished(self) -> bool:
        return self.state["status"] in FINISHED


class StreamSlots:
    """At most `limit` streams open at once in this process (a counter and a lock)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self._lock = threading.Lock()

    def take(self) -> "Slot":
        """A slot, released by the response once it is done; 503 `too-many-streams` when none is left."""
        with self._lock:
            if self.open >= self.limit:
                raise Problem(
                    503,
                    "too-many-streams",
                    "Too many event streams",
                    f"this api process has {self.open} event streams open (at most {self.limit}); "
                    "retry later",
                    headers={"Retry-After": "5"},
                )
            self.open += 1
        return Slot(self)

    def _release(self) -> None:
        with self._lock:
            self.open -= 1


class Slot:
    """One open stream; `release()` is idempotent."""

    def __init__(self, slots: StreamSlots) -> None:
        self._slots: StreamSlots | None = slots

    def release(self) -> None:
        slots, self._slots = self._slots, None
        if slots is not None:
            slots._release()


class EventStreamResponse(StreamingResponse):
    """`text/event-stream`, unbuffered by proxies, releasing its slot however the response ends."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], slot: Slot) -> None:
        super().__init__(
            content,
            media_type=self.media_type,
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
        self.slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()


def read_snapshot(settings: Settings, job_id: uuid.UUID) -> Snapshot | None:
    """The job's state now, from a session opened and closed here; None when the job is gone."""
    with get_session_factory(settings.database_url)() as session:
        row = session.execute(
            select(
                Job.revision,
                Job.status,
                Job.attempts,
                Job.progress,
                Job.result,
                Job.error,
                Job.cancel_requested,
            ).where(Job.id == job_id)
        ).one_or_none()
    if row is None:
        return None
    state = {
        "id": str(job_id),
        "status": JobStatus(row.status).value,
        "attempts": row.attempts,
        "cancel_requested": row.cancel_requested,
        "progress": row.progress,
        "result": row.result,
        "error": row.error,
    }
    return Snapshot(revision=row.revision, state=state)


def parse_last_event_id(value: str | None) -> int | None:
    """The revision a client last saw; 422 for anything but a small non-negative integer."""
    if value is None or value.strip() == "":
        return None
    text = value.strip()
    if not text.isdigit() or len(text) > 18:
        raise Problem(
            422,
            "invalid-last-event-id",
            "Invalid Last-Event-ID",
            "Last-Event-ID must be an event id this stream sent (a non-negative integer)",
        )
    return int(text)


def format_event(snapshot: Snapshot) -> str:
    kind = "end" if snapshot.finished else "progress"
    data = json.dumps(snapshot.state, separators=(",", ":"), default=str)
    return f"id: {snapshot.revision}\nevent: {kind}\ndata: {data}\n\n"


async def job_events(
    settings: Settings, job_id: uuid.UUID, first: Snapshot, last_seen: int | None
) -> AsyncIterator[str]:
    """The stream's text: `first` (unless the client has it), then each change, until the job finishes."""
    yield f"retry: {RETRY_MS}\n\n"
    sent: dict[str, Any] | None = None
    snapshot: Snapshot | None = first
    started = last_output = time.monotonic()
    while True:
        if snapshot is None:  # erased meanwhile
            yield 'event: gone\ndata: {"detail":"the job no longer exists"}\n\n'
            return
        fresh = last_seen is None or snapshot.revision > last_seen
        if fresh and snapshot.state != sent:
            sent = snapshot.state
            last_output = time.monotonic()
            yield format_event(snapshot)
        if snapshot.finished:
            if sent is None:  # the client had the end already: end the stream the same way
                yield format_event(snapshot)
            return
        now = time.monotonic()
        if now - started >= settings.job_events_max_lifetime_s:
            return
        if now - last_output >= settings.job_events_heartbeat_s:
            last_output = now
            yield ": heartbeat\n\n"
        await anyio.sleep(settings.job_events_poll_s)
        snapshot = await anyio.to_thread.run_sync(read_snapshot, settings, job_id)
