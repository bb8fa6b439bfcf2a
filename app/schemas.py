"""Types shared by every resource's schemas."""

from datetime import UTC, datetime
from typing import Annotated

from pydantic import PlainSerializer, StringConstraints

MAX_LABEL_CHARS = 256  # the width of the faces' subject and source columns


def _as_utc_iso(value: datetime) -> str:
    """SQLite returns naive datetimes (stored as UTC), PostgreSQL aware ones: both leave as UTC ISO 8601."""
    aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return aware.isoformat()


UtcDatetime = Annotated[datetime, PlainSerializer(_as_utc_iso, return_type=str, when_used="json")]

NO_NUL_PATTERN = r"^[^\x00]*$"
"""PostgreSQL refuses NUL in text: a value holding one would fail its statement with a 500."""


def stored_text(max_length: int, *, min_length: int = 0) -> StringConstraints:
    """Text the database can store: no NUL, and at most `max_length` characters (its column's width).

    Declare every text a request hands to the database, to store or to filter by, as
    `Annotated[str, stored_text(n)]`: a bad value is then refused with a 422 naming the field before any
    statement runs, on SQLite as on PostgreSQL. Multipart text fields go
    through `app.uploads.check_fields`.
    """
    return StringConstraints(min_length=min_length, max_length=max_length, pattern=NO_NUL_PATTERN)


# A subject or source as a request names it.
FaceLabel = Annotated[str, stored_text(MAX_LABEL_CHARS, min_length=1)]
