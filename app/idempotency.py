"""`Idempotency-Key`: a retried POST gets the answer of the first attempt instead of acting twice.

The answer is stored in the same transaction as the effect, so either both are kept or neither is. Only
successful answers are stored: a request refused with a problem may be retried with the same key once its
cause is fixed. The same key with a different body is a client bug and answers 409.
"""

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Header
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.problems import Problem
from app.tables import IdempotencyRecord

REPLAYED_HEADER = "Idempotent-Replayed"

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=256,
        description="Send the same key when retrying: the first answer is replayed instead of acting twice",
    ),
]


@dataclass(frozen=True)
class Answer:
    status_code: int
    body: dict[str, Any]
    replayed: bool = False


def fingerprint(payload: Any) -> str:
    """A digest of the request's meaning: the same JSON value in any key order or spacing matches."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def run_idempotently(
    session: Session,
    *,
    key: str | None,
    endpoint: str,
    payload: Any,
    act: Callable[[], tuple[int, dict[str, Any]]],
) -> Answer:
    """Run `act` (which must not commit) and commit, or replay what the first request with `key` got."""
    if key is None:
        status_code, body = act()
        session.commit()
        return Answer(status_code, body)
    digest = fingerprint(payload)
    stored = session.get(IdempotencyRecord, (key, endpoint))
    if stored is not None:
        return _replay(stored, digest)
    status_code, body = act()
    session.add(
        IdempotencyRecord(
            key=key, endpoint=endpoint, request_sha256=digest, status_code=status_code, response=body
        )
    )
    try:
        session.commit()
    except IntegrityError:
        # A concurrent request with the same key committed first: answer as it did.
        session.rollback()
        stored = session.get(IdempotencyRecord, (key, endpoint))
        if stored is None:
            raise
        return _replay(stored, digest)
    return Answer(status_code, body)


def _replay(stored: IdempotencyRecord, digest: str) -> Answer:
    if stored.request_sha256 != digest:
        raise Problem(
            409,
            "idempotency-key-reused",
            "Idempotency key reused",
            "this Idempotency-Key was already used with a different request body; use a new key",
        )
    return Answer(stored.status_code, stored.response, replayed=True)
