"""Review pages and leases as the api shows them."""

import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from app.domain import FaceSplit
from app.schemas import UtcDatetime

Reason = Literal["uncertain", "likely-same", "hard-different", "explore"]


class LeaseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: StrictInt | None = Field(
        None, description="pairs wanted, 1..MAGTUNE_REVIEW_MAX_LIMIT (50 by default); 10 when left out"
    )


class ReviewFace(BaseModel):
    id: uuid.UUID
    subject: str | None


class ReviewPair(BaseModel):
    lease_id: uuid.UUID = Field(description="send it as `lease_id` with the answer (POST /v1/feedback)")
    face_a: ReviewFace
    face_b: ReviewFace
    split: FaceSplit = Field(description="the split both faces are in, and the answer's split")
    score: float = Field(description="cosine similarity by the serving model")
    threshold: float | None = Field(description="the serving model's calibrated threshold")
    reason: Reason
    stratum: Literal["predicted-same", "predicted-different"] | None = Field(
        description="val and test pairs: the side of the threshold they were drawn from at random"
    )
    expires_at: UtcDatetime


class ReviewPage(BaseModel):
    model_id: uuid.UUID = Field(description="the serving model that scored the pairs")
    threshold: float | None
    items: list[ReviewPair]
    shares: dict[str, int] = Field(
        description="pairs this page aimed at per split (fewer when none was left)"
    )
    evidence_needed: dict[str, dict[str, int]] = Field(
        description="labels still needed, by split and kind: test (and regression) for the promotion gate, "
        "val for a fine-tune to calibrate on (app/evidence.py)"
    )
