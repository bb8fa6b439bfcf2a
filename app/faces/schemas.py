"""Face resources as the api shows them."""

import uuid

from pydantic import BaseModel, ConfigDict, Field

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
    embedded: bool = Field(
        False,
        description="whether the serving model has embedded it (verify and search can use it); false "
        "when no model serves",
    )
    quality: float | None = Field(
        None,
        description="the norm of the face's un-normalised embedding by the serving model (MagFace's quality: "
        "higher for a clearer, more frontal face; a model trained otherwise gives a norm of no fixed scale); "
        "null when not embedded",
    )
    serving_model_id: uuid.UUID | None = Field(
        None, description="the model whose embeddings answer; null if none"
    )
