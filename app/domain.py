"""The names the service stores and exchanges: job statuses and kinds, model statuses, architectures, splits.

One StrEnum each, in pure standard library, so the api, the worker, the CLI and the schema's CHECK
constraints share a single definition and a typo in a state is an AttributeError instead of a silent
mismatch. A member equals, hashes and serialises as its lowercase string, so stored rows, JSON bodies and
task names are the same as with bare strings.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

_E = TypeVar("_E", bound=StrEnum)


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """A finished job never changes status again (the sweeper and the worker leave it alone)."""
        return self in FINISHED_JOB_STATUSES


ACTIVE_JOB_STATUSES: frozenset[JobStatus] = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})
FINISHED_JOB_STATUSES: frozenset[JobStatus] = frozenset(JobStatus) - ACTIVE_JOB_STATUSES


class JobKind(StrEnum):
    FINETUNE = "finetune"
    EVALUATE = "evaluate"
    REINDEX = "reindex"
    VALIDATE_MODEL = "validate_model"  # internal: created by POST /v1/models, never by POST /v1/jobs
    EMBED = "embed"  # internal: faces stored while a model serves, embedded on arrival (coalesced per model)


INTERNAL_JOB_KINDS: tuple[JobKind, ...] = (JobKind.VALIDATE_MODEL, JobKind.EMBED)
PUBLIC_JOB_KINDS: tuple[JobKind, ...] = tuple(kind for kind in JobKind if kind not in INTERNAL_JOB_KINDS)


class ModelStatus(StrEnum):
    VALIDATING = "validating"
    READY = "ready"  # only ready models can be used by jobs or activated
    INVALID = "invalid"


class Architecture(StrEnum):
    IRESNET18 = "iresnet18"
    IRESNET34 = "iresnet34"
    IRESNET50 = "iresnet50"
    IRESNET100 = "iresnet100"
    MOBILEFACENET = "mobilefacenet"

    @property
    def is_iresnet(self) -> bool:
        return self.startswith("iresnet")


class FaceSplit(StrEnum):
    """A face's split: first where its content hash puts it (app.splits), in the order the hash is cut."""

    TRAIN = "train"
    VAL = "val"
    TEST = "test"


class FeedbackSplit(StrEnum):
    """A pair's split: its faces' common split, `cross` when they differ, or `regression` when posted so."""

    TRAIN = "train"
    VAL = "val"
    TEST = "test"
    CROSS = "cross"  # faces in different splits: used for neither training nor evaluation
    REGRESSION = "regression"  # faces never trained on; the promotion gate checks forgetting on them


# The pair sets jobs use; `cross` pairs are in none of them.
PAIR_SETS: tuple[FeedbackSplit, ...] = tuple(
    split for split in FeedbackSplit if split is not FeedbackSplit.CROSS
)


class EvaluationSplit(StrEnum):
    """The pair sets an evaluation may score (never `train`, which the model has seen)."""

    TEST = "test"
    VAL = "val"
    REGRESSION = "regression"


def parse(enum: type[_E], value: object) -> _E | None:
    """The member whose value is `value`, or None: a membership test that works for any input type."""
    try:
        return enum(value)
    except (ValueError, TypeError):
        return None


def sql_in(column: str, enum: type[StrEnum]) -> str:
    """`column IN ('a', 'b', ...)` over every value of `enum`: the text of a CHECK constraint."""
    values = ", ".join(f"'{member.value}'" for member in enum)
    return f"{column} IN ({values})"
