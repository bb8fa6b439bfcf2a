"""Search requests and answers."""

import uuid

from pydantic import BaseModel, ConfigDict, Field

from app.schemas import FaceLabel

MAX_K = 100


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    face: uuid.UUID = Field(description="the query: a stored face the serving model has embedded")
    k: int = Field(10, ge=1, le=MAX_K, description="how many faces (and at most how many subjects) to return")
    subject: FaceLabel | None = Field(None, description="only faces of this subject")
    source: FaceLabel | None = Field(None, description="only faces from this source")


class FaceMatch(BaseModel):
    id: uuid.UUID
    subject: str | None
    source: str | None
    score: float = Field(description="cosine similarity to the query face")
    same: bool | None = Field(description="score >= the serving model's threshold; null without one")


class SubjectMatch(BaseModel):
    subject: str
    score: float = Field(description="the best score among the subject's faces")
    best_face: uuid.UUID
    same: bool | None


class SearchResult(BaseModel):
    face: uuid.UUID
    model_id: uuid.UUID = Field(description="the serving model, whose embeddings were searched")
    threshold: float | None
    same_reason: str | None = Field(None, description="why every `same` is null")
    results: list[FaceMatch] = Field(description="the k most similar faces, best first, the query excluded")
    subjects: list[SubjectMatch] = Field(
        description="up to k subjects ranked by their best face's score (faces with no subject left out)"
    )
