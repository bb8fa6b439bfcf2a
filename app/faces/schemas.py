"""Face resources as the api shows them."""

import uuid

from pydantic import BaseModel, ConfigDict

from app.domain import FaceSplit
from app.schemas import UtcDatetime


class FaceOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    sha256: str
    width: int
    height: int
    channels: int
    media_type: str
    byte_size: int
    split: FaceSplit
    subject: str | None
    source: str | None
    created_at: UtcDatetime
