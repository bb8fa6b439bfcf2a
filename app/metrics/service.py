"""Dashboard figures: face and pair counts from the maintained tallies (app/tallies.py), the rest counted by
the database (GROUP BY) rather than by loading rows."""

import uuid
from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app import tallies
from app.domain import EvaluationSplit, FeedbackSplit, JobKind, JobStatus
from app.metrics.schemas import (
    ActiveModelSummary,
    ComparedEvaluations,
    ComparisonIntervals,
    DashboardMetrics,
    FaceCounts,
    FeedbackCounts,
    FinetuneSummary,
    GateSummary,
    JobCounts,
    ServingModelSummary,
)
from app.models import service as models_service
from app.models.schemas import EvaluationOut
from app.models.serving import missing_faces, serving_activation
from app.splits import SPLIT_NAMES
from app.tables import Activation, Evaluation, FaceEmbedding, Job, ModelVersion

# Every split a pair may have, `cross` (the wasted labels) included, so a dashboard shows a zero as a zero.
FEEDBACK_SPLITS: tuple[str, ...] = tuple(split.value for split in FeedbackSplit)
LABELS = ("1", "0")
COMPARED_SPLITS = (EvaluationSplit.TEST, EvaluationSplit.REGRESSION)


def _zeros(keys: Iterable[str]) -> dict[str, int]:
    return dict.fromkeys(keys, 0)


def feedback_counts(session: Session) -> FeedbackCounts:
    rows = [(split, label, n) for (split, label), n in tallies.counts(session, tallies.FEEDBACK).items()]
    by_label = _zeros(LABELS)
    by_split = _zeros(FEEDBACK_SPLITS)
    by_split_label = {split: _zeros(LABELS) for split in FEEDBACK_SPLITS}
    for split, label, count in rows:
        by_label[str(label)] = by_label.get(str(label), 0) + count
        by_split[split] = by_split.get(split, 0) + count
        by_split_label.setdefault(split, _zeros(LABELS))[str(label)] += count
    return FeedbackCounts(
        total=sum(by_label.values()), by_label=by_label, by_split=by_split, by_split_label=by_split_label
    )


def _embedded_count(session: Session, model_id: uuid.UUID) -> int:
    statement = select(func.count()).select_from(FaceEmbedding).where(FaceEmbedding.model_id == model_id)
    return int(session.scalar(statement) or 0)


def face_counts(
    session: Session, active_model_id: uuid.UUID | None, serving_model_id: uuid.UUID | None = None
) -> FaceCounts:
    by_split = _zeros(SPLIT_NAMES)
    for split, count in tallies.by_split(session, tallies.FACES).items():
        by_split[split] = by_split.get(split, 0) + count
    counts = FaceCounts(total=sum(by_split.values()), by_split=by_split, embedded_by_active_model=None)
    if active_model_id is not None:
        counts.embedded_by_active_model = _embedded_count(session, active_model_id)
        counts.waiting_for_active_model = missing_faces(session, active_model_id)
    if serving_model_id is not None:
        counts.embedded_by_serving_model = _embedded_count(session, serving_model_id)
        counts.waiting_for_serving_model = missing_faces(session, serving_model_id)
    return counts


def job_counts(session: Session) -> JobCounts:
    by_status = _zeros(JobStatus)
    by_kind_status = {kind: _zeros(JobStatus) for kind in JobKind}
    for kind, status, count in session.execute(
        select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)
    ):
        by_status[status] = by_status.get(status, 0) + count
        by_kind_status.setdefault(kind, _zeros(JobStatus))[status] += count
    return JobCounts(total=sum(by_status.values()), by_status=by_status, by_kind_status=by_kind_status)


def _newest_per_split(evaluations: Iterable[Evaluation]) -> dict[str, EvaluationOut]:
    newest: dict[str, EvaluationOut] = {}
    for evaluation in evaluations:  # newest first
        newest.setdefault(evaluation.split, EvaluationOut.model_validate(evaluation))
    return newest


def active_model_summary(session: Session) -> ActiveModelSummary | None:
    summary = _model_summary(session, models_service.current_activation(session))
    return ActiveModelSummary(**summary) if summary is not None else None


def serving_model_summary(session: Session) -> ServingModelSummary | None:
    """The model verify and search use; the active one's predecessor while the active one is embedding."""
    activation = serving_activation(session)
    summary = _model_summary(session, activation)
    if summary is None or activation is None or activation.embedded_at is None:
        return None
    return ServingModelSummary(**summary, embedded_at=activation.embedded_at)


def _model_summary(session: Session, activation: Activation | None) -> dict[str, Any] | None:
    if activation is None:
        return None
    model = session.get(ModelVersion, activation.model_id)
    if model is None:
        return None
    evaluations = models_service.evaluations_by_model(session, [model.id]).get(model.id, [])
    return {
        "id": model.id,
        "name": model.name,
        "arch": model.arch,
        "threshold": model.threshold,
        "embedding_size": model.embedding_size,
        "parent_id": model.parent_id,
        "activated_at": activation.created_at,
        "activated_by": activation.actor,
        "activation_reason": activation.reason,
        "latest_evaluations": _newest_per_split(evaluations),
    }


def _as_uuid(value: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value)) if value is not None else None
    except ValueError:
        return None


def latest_finetune(session: Session) -> FinetuneSummary | None:
    job = session.scalars(
        select(Job)
        .where(Job.kind == JobKind.FINETUNE)
        .order_by(Job.created_at.desc(), Job.id.desc())
        .limit(1)
    ).first()
    if job is None:
        return None
    result = job.result if isinstance(job.result, dict) else {}
    new_model_id = session.scalar(
        select(ModelVersion.id)
        .where(ModelVersion.created_by_job_id == job.id)
        .order_by(ModelVersion.created_at.desc())
        .limit(1)
    ) or _as_uuid(result.get("model_id"))
    parent_id = _as_uuid((job.params or {}).get("base_model"))

    scored = session.scalars(
        select(Evaluation)
        .where(Evaluation.job_id == job.id, Evaluation.split.in_(COMPARED_SPLITS))
        .order_by(Evaluation.created_at.desc(), Evaluation.id.desc())
    ).all()
    by_model = {
        model_id: _newest_per_split(e for e in scored if e.model_id == model_id)
        for model_id in (new_model_id, parent_id)
        if model_id is not None
    }
    evaluations = {
        split: ComparedEvaluations(
            candidate=by_model.get(new_model_id, {}).get(split) if new_model_id else None,
            parent=by_model.get(parent_id, {}).get(split) if parent_id else None,
        )
        for split in COMPARED_SPLITS
    }
    gate = result.get("gate") if isinstance(result.get("gate"), dict) else None
    promoted = gate.get("promoted") if gate is not None else None
    return FinetuneSummary(
        job_id=job.id,
        status=job.status,
        created_at=job.created_at,
        finished_at=job.finished_at,
        progress=job.progress,
        error=job.error,
        parent_model_id=parent_id,
        new_model_id=new_model_id,
        evaluations=evaluations,
        gate=gate,
        promoted=promoted if isinstance(promoted, bool) else None,
    )


def _intervals(value: Any) -> ComparisonIntervals | None:
    try:
        return ComparisonIntervals.model_validate(value) if isinstance(value, dict) else None
    except ValidationError:
        return None  # a result written before the bootstrap, or a figure it could not compute


def latest_gate(session: Session) -> GateSummary | None:
    """The newest fine-tune that reached the gate (one that failed or was cancelled earlier did not)."""
    job = session.scalars(
        select(Job)
        .where(Job.kind == JobKind.FINETUNE, Job.status == JobStatus.SUCCEEDED)
        .order_by(Job.finished_at.desc(), Job.id.desc())
        .limit(1)
    ).first()
    result = job.result if job is not None and isinstance(job.result, dict) else {}
    gate = result.get("gate")
    if job is None or not isinstance(gate, dict):
        return None
    intervals = gate.get("intervals") if isinstance(gate.get("intervals"), dict) else {}
    evidence = gate.get("evidence")
    return GateSummary(
        job_id=job.id,
        decided_at=job.finished_at,
        candidate_model_id=_as_uuid(result.get("model_id")),
        parent_model_id=_as_uuid(result.get("parent_id")),
        promoted=bool(gate.get("promoted")),
        passed=bool(gate.get("passed")),
        refusals=[str(code) for code in gate.get("refusals") or []],
        reasons=[str(reason) for reason in gate.get("reasons") or []],
        intervals={split: _intervals(intervals.get(split)) for split in COMPARED_SPLITS},
        evidence=evidence if isinstance(evidence, dict) else None,
    )


def dashboard(*, session: Session) -> DashboardMetrics:
    active_id = models_service.active_model_id(session)
    serving = serving_model_summary(session)
    return DashboardMetrics(
        feedback=feedback_counts(session),
        faces=face_counts(session, active_id, serving.id if serving is not None else None),
        jobs=job_counts(session),
        active_model=active_model_summary(session),
        serving_model=serving,
        latest_finetune=latest_finetune(session),
        latest_gate=latest_gate(session),
    )
