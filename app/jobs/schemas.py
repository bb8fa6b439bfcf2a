"""Request and response bodies of /v1/jobs."""

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.domain import JobKind, JobStatus
from app.jobs.params import EvaluateParams, FinetuneParams, ReindexParams
from app.schemas import UtcDatetime


# Each body's `kind` is its JobKind's value, so an unknown kind's error lists the plain names.
class FinetuneJobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal[JobKind.FINETUNE.value]
    params: FinetuneParams = Field(default_factory=FinetuneParams)


class EvaluateJobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal[JobKind.EVALUATE.value]
    params: EvaluateParams = Field(default_factory=EvaluateParams)


class ReindexJobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal[JobKind.REINDEX.value]
    params: ReindexParams = Field(default_factory=ReindexParams)


JobCreate = Annotated[FinetuneJobCreate | EvaluateJobCreate | ReindexJobCreate, Field(discriminator="kind")]
# One body per public kind: a kind added to JobKind without one fails tests/app/test_domain.py.
JOB_CREATE_BODIES: tuple[type[BaseModel], ...] = (FinetuneJobCreate, EvaluateJobCreate, ReindexJobCreate)


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
    trigger: dict[str, Any] | None = Field(
        None, description="why the service queued this job by itself (the auto fine-tune policy); else null"
    )
    created_by: str | None = Field(description="The API key that created it (null: an internal job)")
    cancelled_by: str | None = Field(description="The API key that cancelled it")
    created_at: UtcDatetime
    enqueued_at: UtcDatetime | None
    started_at: UtcDatetime | None
    heartbeat_at: UtcDatetime | None
    finished_at: UtcDatetime | None
