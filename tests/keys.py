"""API keys for tests: issued straight into a database, as `magtune keys create` does."""

from collections.abc import Iterable
from datetime import timedelta

from app.auth.keys import issue_key, revoke_key
from app.auth.scopes import ALL_SCOPES, Scope
from app.db import get_session_factory


def issue_test_key(
    database_url: str,
    scopes: Iterable[Scope | str] = ALL_SCOPES,
    *,
    name: str = "tests",
    expires_in: timedelta | None = None,
    revoked: bool = False,
) -> str:
    """A committed key with these scopes (every scope by default); returns the whole key."""
    with get_session_factory(database_url)() as session:
        issued = issue_key(session, name=name, scopes=scopes, expires_in=expires_in)
        if revoked:
            revoke_key(session, issued.row.id)
        session.commit()
        return issued.secret


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def key_id(key: str) -> str:
    return key.split("_")[1]
