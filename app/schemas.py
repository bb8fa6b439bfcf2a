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

# A subject or source as a request names it: what the database can store (PostgreSQL refuses NUL in text).
FaceLabel = Annotated[str, StringConstraints(min_length=1, max_length=MAX_LABEL_CHARS, pattern=r"^[^\x00]*$")]
