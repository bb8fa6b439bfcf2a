"""Model registry resources as the api shows them."""

import uuid
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from app.domain import Architecture, EvaluationSplit, JobStatus, ModelStatus
from app.schemas import UtcDatetime, stored_text


class EvaluationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    split: EvaluationSplit
    pairs_sha256: str
    pair_count: int
    threshold: float | None
    metrics: dict[str, Any]
    job_id: uuid.UUID | None
    created_at: UtcDatetime


class ValidationJobOut(BaseModel):
    """The job that loads an uploaded checkpoint strictly: the model stays `validating` until it finishes."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    status: JobStatus
    error: dict[str, Any] | None = Field(None, description="why the job failed, as problem fields")


class ModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str | None
    arch: Architecture
    status: ModelStatus
    status_reason: str | None
    sha256: str
    byte_size: int
    embedding_size: int | None
    preprocess: dict[str, Any] | None
    threshold: float | None
    parent_id: uuid.UUID | None
    created_by_job_id: uuid.UUID | None
    hyperparameters: dict[str, Any] | None
    dataset_snapshot: dict[str, Any] | None
    created_at: UtcDatetime
    validated_at: UtcDatetime | None
    is_active: bool = False
    validation_job: ValidationJobOut | None = Field(
        None, description="the upload's strict load by the worker; null for a model a fine-tune registered"
    )
    evaluations: list[EvaluationOut] = Field(default_factory=list, description="newest first")


class ActiveModelOut(ModelOut):
    """The activated model, and the model that answers verify and search while a switch is under way."""

    serving_model_id: uuid.UUID | None = Field(
        None,
        description="the model whose embeddings verify and search use: this one once it has embedded every "
        "face, the previous one until then; null when none has yet",
    )
    switching: bool = Field(
        False, description="true while the activated model is not yet the serving one (it is embedding faces)"
    )
    waiting_faces: int = Field(0, description="faces the activated model has not embedded yet")


class ModelRegistered(ModelOut):
    validation_job_id: uuid.UUID | None = Field(
        None, description="the job that loads the checkpoint strictly; null when the model was known already"
    )


class ActivationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, stored_text(2000)] | None = None


class ActivationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    model_id: uuid.UUID
    previous_model_id: uuid.UUID | None
    actor: str | None = Field(
        description="Who: the name of the API key that activated it, or auto-promote for the promotion gate"
    )
    api_key_id: str | None = Field(None, description="The API key that activated it")
    reason: str | None
    job_id: uuid.UUID | None = Field(None, description="the job that caused the activation (auto-promotion)")
    created_at: UtcDatetime


class ActivationResult(ActivationOut):
    reindex_job_id: uuid.UUID | None = Field(
        None, description="the job that embeds every face with this model; null when it was active already"
    )
