"""Feedback resources as the api shows them."""

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from app.domain import FeedbackSplit
from app.schemas import UtcDatetime, stored_text

REVIEW_SOURCE = "review"

Label = Annotated[
    StrictInt,
    Field(
        ge=0, le=1, description="1: the same person; 0: different people. Booleans and strings are refused"
    ),
]


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    face_a: uuid.UUID
    face_b: uuid.UUID
    label: Label
    annotator: Annotated[str, stored_text(256)] | None = None
    source: Annotated[str, stored_text(256)] | None = None
    split: Literal[FeedbackSplit.REGRESSION] | None = Field(
        default=None,
        description='"regression" puts the pair in the regression set, whose faces are never trained on; '
        "otherwise the pair takes its faces' common split (train, val, test) or, when they differ, "
        '"cross", which is used for neither training nor evaluation',
    )
    lease_id: uuid.UUID | None = Field(
        default=None,
        description="the review lease this answers (POST /v1/review/leases): the pair must be the one it "
        'holds; the answer is recorded with source "review" and the lease is released',
    )

    @model_validator(mode="after")
    def _lease_answers_are_reviews(self) -> "FeedbackIn":
        if self.lease_id is not None:
            if self.source not in (None, REVIEW_SOURCE):
                raise ValueError(f'an answer to a lease is recorded with source "{REVIEW_SOURCE}"')
            if self.split is not None:
                raise ValueError("an answer to a lease takes the split of its faces, not the regression set")
        return self


class FeedbackOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    face_a: uuid.UUID
    face_b: uuid.UUID
    label: int
    split: FeedbackSplit
    annotator: str | None
    source: str | None
    api_key_id: str | None = Field(description="The API key that posted it (null: before keys existed)")
    created_at: UtcDatetime


class FeedbackBatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[Any] = Field(
        description="Each item as the body of POST /v1/feedback; bad items are reported one by one",
    )


class ItemError(BaseModel):
    type: str
    title: str
    detail: str | None = None
    errors: list[dict[str, Any]] | None = None
    feedback_id: uuid.UUID | None = Field(default=None, description="The stored pair a conflict is with")


class ItemResult(BaseModel):
    index: int
    status: Literal["created", "existing", "error"]
    id: uuid.UUID | None = None
    split: FeedbackSplit | None = Field(default=None, description="The stored pair's split")
    error: ItemError | None = None


class FeedbackBatchOut(BaseModel):
    results: list[ItemResult]
    created: int
    existing: int
    failed: int
