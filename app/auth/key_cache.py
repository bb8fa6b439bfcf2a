"""Verified keys remembered by one api process, forgotten the moment PostgreSQL says any key changed.

Reading the key's row on every request cost a database round trip per request, the largest single cost of a
feedback post. Instead each api process keeps the keys it has verified, and a thread of its own LISTENs on
the channel that a trigger on `api_keys` notifies on every revocation, expiry, scope or secret change,
deletion and truncation (revision 2026_12_07_0010). PostgreSQL sends the notification when the revoking
transaction commits, before the revoking request has even answered, so a revoked key is refused at once in
every process, whoever revoked it: the api, `magtune keys revoke`, or an operator's own SQL.

The cache is trusted only while its listener is connected: before the first LISTEN, after a lost connection
and until the next LISTEN succeeds, every request reads the database as before. A read that raced a
notification is not kept (the generation counter), and no entry lives longer than `MAX_AGE_S`.
On SQLite (one file, no network between process and data) the cache stays off.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime

from app.auth.keys import Caller
from app.config import Settings
from app.db import libpq_url

log = logging.getLogger(__name__)

CHANNEL = "magtune_api_keys"
MAX_AGE_S = 10.0  # a bound on trust, should a notification ever be lost
POLL_S = 0.5  # how often the listener checks its connection and whether it should stop
RETRY_S = 2.0
APPLICATION_NAME = "magtune-key-listener"


@dataclass(frozen=True, slots=True)
class _Entry:
    digest: bytes
    caller: Caller
    expires_at: datetime | None
    stored_at: float


class KeyCache:
    """key id → the caller its secret proved, for as long as no change to `api_keys` was announced."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._generation = 0
        self._live = False

    def generation(self) -> int | None:
        """Take before reading a key from the database; None while nothing would tell of a change."""
        with self._lock:
            return self._generation if self._live else None

    def store(
        self, key_id: str, digest: bytes, caller: Caller, expires_at: datetime | None, generation: int | None
    ) -> None:
        """Keep what a database read proved, unless a change was announced since `generation` was taken."""
        with self._lock:
            if generation is not None and self._live and generation == self._generation:
                self._entries[key_id] = _Entry(digest, caller, expires_at, time.monotonic())

    def lookup(self, key_id: str, digest: bytes, now: datetime) -> Caller | None:
        """The caller when this key was verified with this very secret, is unexpired and nothing changed."""
        with self._lock:
            entry = self._entries.get(key_id) if self._live else None
        if entry is None or entry.digest != digest:  # a wrong secret goes to the database and its 401
            return None
        if time.monotonic() - entry.stored_at > MAX_AGE_S:
            return None
        if entry.expires_at is not None and entry.expires_at <= now:
            return None
        return entry.caller

    def forget_all(self, *, live: bool | None = None) -> None:
        """A key changed (or the listener's state did): drop everything and void reads in flight."""
        with self._lock:
            self._entries.clear()
            self._generation += 1
            if live is not None:
                self._live = live


class KeyChangeListener:
    """The thread that keeps a KeyCache honest: LISTEN on CHANNEL, forget everything on each notification."""

    def __init__(self, cache: KeyCache, libpq_url: str) -> None:
        self.cache = cache
        self._url = libpq_url
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="magtune-key-listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end (within POLL_S); the cache is off from now on."""
        self._stop.set()
        self.cache.forget_all(live=False)

    def _run(self) -> None:
        import psycopg

        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self._url,
                    autocommit=True,
                    connect_timeout=5,
                    application_name=APPLICATION_NAME,
                    tcp_user_timeout=int(1000 * RETRY_S),  # a silent network must not keep the cache trusted
                    keepalives_idle=1,
                ) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.cache.forget_all(live=True)
                    while not self._stop.is_set():
                        for _notice in conn.notifies(timeout=POLL_S):
                            self.cache.forget_all()
                        conn.execute("SELECT 1")  # a dead connection must not leave the cache trusted
            except Exception as exc:
                self.cache.forget_all(live=False)
                if not self._stop.is_set():
                    log.warning("key-change listener lost its connection (%s); retrying", type(exc).__name__)
                    self._stop.wait(RETRY_S)
        self.cache.forget_all(live=False)


def start_key_listener(settings: Settings, cache: KeyCache) -> KeyChangeListener | None:
    """Start trusting `cache` once its listener is connected: PostgreSQL with auth on; else None (off)."""
    if settings.auth_disabled or not settings.database_url.startswith("postgresql"):
        return None
    listener = KeyChangeListener(cache, libpq_url(settings.database_url))
    listener.start()
    return listener
