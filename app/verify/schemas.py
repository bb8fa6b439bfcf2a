"""Verification requests and answers."""

import uuid
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.schemas import FaceLabel


class VerifyRequest(BaseModel):
    """Exactly one form: two faces (`face_a`, `face_b`), or a face and a subject (`face`, `subject`)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"face_a": "6f1c…", "face_b": "0b9e…"},
                {"face": "6f1c…", "subject": "salley"},
            ]
        },
    )

    face_a: uuid.UUID | None = None
    face_b: uuid.UUID | None = None
    face: uuid.UUID | None = None
    subject: FaceLabel | None = None

    @model_validator(mode="after")
    def _one_form(self) -> Self:
        pair = self.face_a is not None or self.face_b is not None
        subject = self.face is not None or self.subject is not None
        if pair and subject:
            raise ValueError("give either face_a and face_b, or face and subject, not both")
        if pair and (self.face_a is None or self.face_b is None):
            raise ValueError("face_a and face_b go together")
        if subject and (self.face is None or self.subject is None):
            raise ValueError("face and subject go together")
        if not pair and not subject:
            raise ValueError("give face_a and face_b, or face and subject")
        return self


class Verdict(BaseModel):
    model_id: uuid.UUID = Field(description="the serving model, whose embeddings were compared")
    threshold: float | None = Field(
        description="the serving model's calibrated threshold; null if it has none"
    )
    same: bool | None = Field(
        description="score >= threshold; null when there is no threshold (see same_reason)"
    )
    same_reason: str | None = Field(None, description="why `same` is null")


class PairVerdict(Verdict):
    face_a: uuid.UUID
    face_b: uuid.UUID
    score: float = Field(description="cosine similarity of the two embeddings, in [-1, 1]")


class SubjectVerdict(Verdict):
    face: uuid.UUID
    subject: str
    best_score: float = Field(
        description="the highest cosine between the face and one of the subject's faces"
    )
    best_face: uuid.UUID = Field(description="the subject's face that scored best_score")
    mean_score: float = Field(description="mean cosine over the faces compared")
    compared: int = Field(
        description="the subject's faces compared (embedded ones, the face itself excluded)"
    )
    waiting: int = Field(description="the subject's faces left out because they are not embedded yet")
