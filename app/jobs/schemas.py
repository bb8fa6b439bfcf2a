"""Request and response bodies of /v1/jobs."""

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.jobs.params import EvaluateParams, FinetuneParams, JobKind, JobStatus, ReindexParams
from app.schemas import UtcDatetime


class FinetuneJobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["finetune"]
    params: FinetuneParams = Field(default_factory=FinetuneParams)


class EvaluateJobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["evaluate"]
    params: EvaluateParams = Field(default_factory=EvaluateParams)


class ReindexJobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["reindex"]
    params: ReindexParams = Field(default_factory=ReindexParams)


JobCreate = Annotated[FinetuneJobCreate | EvaluateJobCreate | ReindexJobCreate, Field(discriminator="kind")]


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    kind: JobKind
    status: JobStatus
    progress: dict[str, Any] | None
    params: dict[str, Any]
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    attempts: int
    max_attempts: int
    cancel_requested: bool
    parent_job_id: uuid.UUID | None
    created_at: UtcDatetime
    enqueued_at: UtcDatetime | None
    started_at: UtcDatetime | None
    heartbeat_at: UtcDatetime | None
    finished_at: UtcDatetime | None
