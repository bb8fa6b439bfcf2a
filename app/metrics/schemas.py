"""The dashboard document of `GET /v1/metrics`."""

import uuid
from typing import Any

from pydantic import BaseModel, Field

from app.models.schemas import EvaluationOut
from app.schemas import UtcDatetime


class FeedbackCounts(BaseModel):
    total: int
    by_label: dict[str, int] = Field(description='"1": same person, "0": different people')
    by_split: dict[str, int]
    by_split_label: dict[str, dict[str, int]]


class FaceCounts(BaseModel):
    total: int
    by_split: dict[str, int]
    embedded_by_active_model: int | None = Field(description="null when no model is active")
    waiting_for_active_model: int | None = Field(
        None, description="faces the active model has not embedded yet; null when no model is active"
    )
    embedded_by_serving_model: int | None = Field(
        None, description="faces the serving model (the one verify and search use) has embedded; null if none"
    )
    waiting_for_serving_model: int | None = Field(
        None, description="faces verify and search cannot use yet (not embedded); null when no model serves"
    )


class FeedbackSeriesPoint(BaseModel):
    start: UtcDatetime = Field(description="the bucket's first instant (UTC)")
    total: int
    by_split_label: dict[str, dict[str, int]] = Field(
        description='pairs created in the bucket per split, then label ("1" same, "0" different)'
    )


class FeedbackSeries(BaseModel):
    """Feedback pairs created per bucket over a bounded window, oldest bucket first, zeros included."""

    bucket: str = Field(description="hour or day (UTC-aligned)")
    bucket_seconds: int
    start: UtcDatetime = Field(description="the window's first instant")
    end: UtcDatetime = Field(description="the instant after the window's last bucket")
    splits: list[str]
    wasted_split: str = Field(
        description="the split of wasted labels: pairs whose faces fell in different splits, used by no job"
    )
    points: list[FeedbackSeriesPoint]


class JobCounts(BaseModel):
    total: int
    by_status: dict[str, int]
    by_kind_status: dict[str, dict[str, int]]


class ActiveModelSummary(BaseModel):
    id: uuid.UUID
    name: str | None
    arch: str
    threshold: float | None
    embedding_size: int | None
    parent_id: uuid.UUID | None
    activated_at: UtcDatetime
    activated_by: str | None
    activation_reason: str | None
    latest_evaluations: dict[str, EvaluationOut] = Field(description="the newest evaluation of each split")


class ServingModelSummary(ActiveModelSummary):
    """The model verify and search use: the latest activated one whose embeddings covered every face."""

    embedded_at: UtcDatetime = Field(description="when its embeddings first covered every face")


class ComparedEvaluations(BaseModel):
    candidate: EvaluationOut | None
    parent: EvaluationOut | None


class FinetuneSummary(BaseModel):
    job_id: uuid.UUID
    status: str
    created_at: UtcDatetime
    finished_at: UtcDatetime | None
    progress: dict[str, Any] | None
    error: dict[str, Any] | None
    parent_model_id: uuid.UUID | None
    new_model_id: uuid.UUID | None
    evaluations: dict[str, ComparedEvaluations] = Field(
        description="per split (test, regression): both models scored by this fine-tune on the same pairs"
    )
    gate: dict[str, Any] | None = Field(description="the promotion decision as the worker recorded it")
    promoted: bool | None


class Interval(BaseModel):
    """A difference candidate − parent on the pairs as they are, and its bootstrap percentile interval."""

    estimate: float | None = Field(description="null when the figure is undefined (a class is missing)")
    low: float | None
    high: float | None


class ComparisonIntervals(BaseModel):
    """The paired bootstrap of one set (test or regression), resampling faces (worker/ml/bootstrap.py)."""

    samples: int
    seed: int
    confidence: float
    pairs: int
    faces: int
    valid: int = Field(description="resamples that drew both same and different pairs")
    roc_auc: Interval
    eer: Interval = Field(description="a negative difference favours the candidate")
    tar_at_far_1e_2: Interval


class GateSummary(BaseModel):
    """The newest promotion decision: the newest fine-tune that reached the gate."""

    job_id: uuid.UUID
    decided_at: UtcDatetime | None
    candidate_model_id: uuid.UUID | None
    parent_model_id: uuid.UUID | None
    promoted: bool
    passed: bool
    refusals: list[str] = Field(description="codes of the failed checks that have one: not-enough-evidence")
    reasons: list[str]
    intervals: dict[str, ComparisonIntervals | None] = Field(
        description="per set (test, regression); null where it was not measured or could not be read"
    )
    evidence: dict[str, Any] | None = Field(
        description="the pairs the gate judged on, the minimums, and the labels still needed by split"
    )


class DashboardMetrics(BaseModel):
    feedback: FeedbackCounts
    faces: FaceCounts
    jobs: JobCounts
    active_model: ActiveModelSummary | None
    serving_model: ServingModelSummary | None = Field(
        None, description="differs from active_model while a newly activated model is still embedding faces"
    )
    latest_finetune: FinetuneSummary | None
    latest_gate: GateSummary | None = Field(
        None, description="the newest gate decision with its bootstrap intervals; null before the first"
    )
