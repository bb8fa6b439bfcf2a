"""API keys: issue, verify, list, revoke.

A key reads `mt_<id>_<secret>`: `id` is 16 hex characters, public, the primary key of its row and the only
part ever logged; `secret` is 32 random bytes (43 url-safe characters). Only the secret's SHA-256 is stored:
with 256 bits of entropy a fast hash is as good as a slow one, and it keeps the check cheap. Comparison is
constant-time. A key is read from the database once, then remembered by the api process until PostgreSQL
announces a change to any key (app.auth.key_cache), so a revocation holds at once in every api process;
`last_used_at` is written at most once a minute per key and process, never once per request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Protocol

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from app.auth.scopes import Scope
from app.problems import Problem
from app.tables import ApiKey, utcnow

if TYPE_CHECKING:
    from app.auth.key_cache import KeyCache

PREFIX = "mt_"
KEY_PATTERN = re.compile(r"^mt_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
MAX_KEY_CHARS = 256  # anything longer is refused before any parsing
LAST_USED_EVERY_S = 60.0


@dataclass(frozen=True)
class Caller:
    """The key a request was made with: its id (for who-did-what), its name and scopes."""

    key_id: str
    name: str
    scopes: frozenset[str]


@dataclass(frozen=True)
class IssuedKey:
    row: ApiKey
    secret: str  # the whole key, shown once


def unauthenticated(detail: str) -> Problem:
    """401 for a key that is missing, malformed, unknown, revoked or expired (never echoing the key)."""
    return Problem(
        401,
        "unauthenticated",
        "Unauthenticated",
        detail,
        headers={"WWW-Authenticate": 'Bearer realm="magtune"'},
    )


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def parse_key(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed key, else None."""
    if len(token) > MAX_KEY_CHARS:
        return None
    match = KEY_PATTERN.match(token)
    return (match.group(1), match.group(2)) if match else None


def issue_key(
    session: Session,
    *,
    name: str,
    scopes: Iterable[Scope | str],
    expires_in: timedelta | None = None,
    created_by: str | None = None,
) -> IssuedKey:
    """Add a key (flushed, not committed); the returned secret is the only copy there will ever be."""
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    now = utcnow()
    row = ApiKey(
        id=key_id,
        name=name,
        secret_sha256=_digest(secret),
        scopes=sorted({Scope(scope).value for scope in scopes}),
        created_at=now,
        expires_at=now + expires_in if expires_in is not None else None,
        created_by=created_by,
    )
    session.add(row)
    session.flush()
    return IssuedKey(row=row, secret=f"{PREFIX}{key_id}_{secret}")


class _KeyTimes(Protocol):
    """What a key's state depends on: an ApiKey, or the row the per-request check reads."""

    revoked_at: datetime | None
    expires_at: datetime | None


def key_state(row: _KeyTimes, now: datetime | None = None) -> str:
    now = now or utcnow()
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at is not None and _aware(row.expires_at) <= now:
        return "expired"
    return "active"


class LastUsed:
    """Writes `last_used_at` at most once per `every_s` per key in this process (a dict and a lock)."""

    def __init__(self, every_s: float = LAST_USED_EVERY_S) -> None:
        self.every_s = every_s
        self._written: dict[str, float] = {}
        self._lock = threading.Lock()

    def due(self, key_id: str) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._written.get(key_id, -self.every_s) < self.every_s:
                return False
            self._written[key_id] = now
            return True


# The columns a request's check needs, read as a plain Core row on the session's own connection (and so in
# the request's transaction): an ORM load of the whole row cost several times as much on the ingest path.
_KEY_CHECK = select(
    ApiKey.secret_sha256, ApiKey.name, ApiKey.scopes, ApiKey.revoked_at, ApiKey.expires_at
).where(ApiKey.id == bindparam("key_id"))


def verify_key(session: Session, token: str, last_used: LastUsed, cache: KeyCache | None = None) -> Caller:
    """The caller of a valid key, read from the database; else 401 `unauthenticated` saying why, naming at
    most the key's id. A valid key is remembered in `cache` (see app.auth.key_cache)."""
    parsed = parse_key(token)
    if parsed is None:
        raise unauthenticated("the key is malformed: expected mt_<id>_<secret>")
    key_id, secret = parsed
    digest = _digest(secret)
    generation = cache.generation() if cache is not None else None
    row = session.connection().execute(_KEY_CHECK, {"key_id": key_id}).one_or_none()
    if row is None or not hmac.compare_digest(row.secret_sha256, digest):
        raise unauthenticated(f"unknown key {key_id}")
    state = key_state(row)
    if state != "active":
        raise unauthenticated(f"key {key_id} is {state}")
    if last_used.due(key_id):
        touch_last_used(session, key_id)
    caller = Caller(key_id=key_id, name=row.name, scopes=frozenset(row.scopes))
    if cache is not None:
        expires_at = _aware(row.expires_at) if row.expires_at is not None else None
        cache.store(key_id, digest, caller, expires_at, generation)
    return caller


def remembered_caller(cache: KeyCache, token: str) -> Caller | None:
    """The caller of a key this process verified and no change has touched since; None: ask the database."""
    parsed = parse_key(token)
    if parsed is None:
        return None
    key_id, secret = parsed
    return cache.lookup(key_id, _digest(secret), utcnow())


def touch_last_used(session: Session, key_id: str) -> None:
    """Record that the key was used (committed); callers throttle this with LastUsed."""
    session.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=utcnow()))
    session.commit()


def revoke_key(session: Session, key_id: str) -> ApiKey | None:
    """Revoke a key (idempotent: a revoked key keeps its first revocation time); None when unknown."""
    row = session.get(ApiKey, key_id)
    if row is None:
        return None
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    session.flush()
    return row


def all_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at.desc(), ApiKey.id)))
