"""Face resources as the api shows them."""

import uuid
from datetime import UTC, datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, PlainSerializer


def _as_utc_iso(value: datetime) -> str:
    """SQLite returns naive datetimes (stored as UTC), PostgreSQL aware ones: both leave as UTC ISO 8601."""
    aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return aware.isoformat()


UtcDatetime = Annotated[datetime, PlainSerializer(_as_utc_iso, return_type=str, when_used="json")]


class FaceOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    sha256: str
    width: int
    height: int
    channels: int
    media_type: str
    byte_size: int
    split: str
    subject: str | None
    source: str | None
    created_at: UtcDatetime
