"""evaluate: score one split's feedback pairs with a model (and optionally a second one on the same pairs).

Each model is judged at its own threshold: the one stored with it, or, for a model that has none, one
calibrated on the val pairs with that model; `threshold_source` in the metrics says which. Each score becomes
an Evaluation row carrying the pairs' hash, so two evaluations on identical pairs can be told apart from
evaluations on a set that has since grown. With `compare_to`, `result.compare_to.intervals` holds the paired
face bootstrap of the differences the promotion gate uses (worker/ml/bootstrap.py).

With `calibrate` (split val only; queued when a model without a threshold is activated), the threshold
calibrated on val is also stored with the model, unless it has one by then: an uploaded base checkpoint gets
the same kind of threshold a fine-tune gives its checkpoint, from held-out feedback.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from app.domain import EvaluationSplit
from app.tables import Evaluation, ModelVersion
from worker.jobs.comparison import bootstrap_config
from worker.jobs.data import (
    FeedbackRow,
    decode_faces,
    face_digests,
    has_both_labels,
    indexed_pairs,
    label_counts,
    load_feedback,
    pairs_sha256,
)
from worker.jobs.registry import (
    LoadedModel,
    blob_store,
    calibrated_threshold,
    load_model,
    model_row,
    record_evaluation,
    threshold_for,
)
from worker.ml.embedding import select_device
from worker.ml.evaluation import ModelUnderTest, compare_models, evaluate
from worker.ml.pairs import IndexedPairs
from worker.runtime import JobContext, JobFailed

log = logging.getLogger(__name__)

# The sets an Evaluation row may name (the api refuses `train` for the same reason: the model saw it).
SPLITS: tuple[str, ...] = tuple(split.value for split in EvaluationSplit)


def _models(ctx: JobContext) -> tuple[LoadedModel, LoadedModel | None]:
    with ctx.session() as session:
        rows = [model_row(session, ctx.params.get("model"))]
        if ctx.params.get("compare_to") is not None:
            rows.append(model_row(session, ctx.params["compare_to"], role="compare_to"))
    loaded = [load_model(ctx.settings, row) for row in rows]
    return loaded[0], (loaded[1] if len(loaded) > 1 else None)


def _pairs(
    ctx: JobContext, split: str, size: int
) -> tuple[list[FeedbackRow], IndexedPairs, IndexedPairs | None]:
    """The split's pairs and, for models without a stored threshold, the val pairs to calibrate one on."""
    with ctx.session() as session:
        sets = load_feedback(session)
        digests = face_digests(session)
    rows, val_rows = sets.pairs[split], sets.pairs["val"]
    if ctx.params.get("calibrate") and not has_both_labels(val_rows):
        counts = label_counts(val_rows)
        raise JobFailed(
            "not-enough-feedback",
            "Cannot calibrate a threshold",
            f"cannot calibrate: val has {counts['same']} same and {counts['different']} different pairs",
        )
    if not rows:
        raise JobFailed("not-enough-feedback", "No pairs to evaluate", f"the {split} split has no pairs")
    pixels = decode_faces(blob_store(ctx.settings), digests, sets.faces(split, "val"), size=size)
    val = indexed_pairs(val_rows, pixels) if val_rows else None
    return rows, indexed_pairs(rows, pixels), val


def run(ctx: JobContext) -> dict[str, Any]:
    split = str(ctx.params.get("split", EvaluationSplit.TEST))
    if split not in SPLITS:
        raise JobFailed("invalid-job-params", "Invalid job parameters", f"split must be one of {SPLITS}")
    calibrate = bool(ctx.params.get("calibrate"))
    if calibrate and split != EvaluationSplit.VAL:
        raise JobFailed("invalid-job-params", "Invalid job parameters", "calibrate needs split val")
    ctx.progress(phase="loading", force=True)
    model, other = _models(ctx)
    rows, pairs, val = _pairs(ctx, split, model.spec.size)
    ctx.raise_if_cancelled("before scoring")
    device = select_device()
    ctx.progress(phase="scoring", pairs=len(rows), force=True)
    calibrated: float | None = None
    if calibrate:
        calibrated = calibrated_threshold(model, val, device=device)
        # Judged at the threshold the model will have: its own if it got one meanwhile, else this one.
        own = model.threshold is not None
        threshold, source = (model.threshold, "model") if own else (calibrated, "val")
    else:
        threshold, source = threshold_for(model, val, device=device)
    result: dict[str, Any] = {
        "model_id": str(model.id),
        "split": split,
        "pairs_sha256": pairs_sha256(rows),
        "pair_count": len(rows),
        "labels": label_counts(rows),
    }
    if other is None:
        metrics = evaluate(
            model.backbone, model.spec, pairs, threshold, threshold_source=source or "model", device=device
        )
        comparison = None
    else:
        other_threshold, other_source = threshold_for(other, val, device=device)
        comparison = compare_models(
            ModelUnderTest(other.backbone, other.spec, other_threshold, other_source or "model"),
            model.under_test(threshold, source or "model"),
            pairs,
            device=device,
            bootstrap=bootstrap_config(ctx.settings),
        )
        metrics = comparison["candidate"]
    with ctx.session() as session:
        if calibrate:
            result["calibration"] = _store_threshold(session, model.id, calibrated)
        evaluation = record_evaluation(
            session, model_id=model.id, job_id=ctx.job.id, split=split, rows=rows, metrics=metrics
        )
        result.update(evaluation_id=str(evaluation.id), threshold=evaluation.threshold, metrics=metrics)
        if comparison is not None and other is not None:
            baseline: Evaluation = record_evaluation(
                session,
                model_id=other.id,
                job_id=ctx.job.id,
                split=split,
                rows=rows,
                metrics=comparison["baseline"],
            )
            result["compare_to"] = {
                "model_id": str(other.id),
                "evaluation_id": str(baseline.id),
                "threshold": baseline.threshold,
                "metrics": comparison["baseline"],
                "deltas": comparison["deltas"],
                "intervals": comparison["intervals"],
            }
    if calibrate:
        outcome = "stored" if result["calibration"]["stored"] else "not stored: the model has one already"
        log.info(
            "job %s: threshold %.4f calibrated on val for model %s (%s)",
            ctx.job.id,
            calibrated,
            model.id,
            outcome,
        )
    ctx.progress(phase="done", pairs=len(rows), force=True)
    return result


def _store_threshold(session: Session, model_id: uuid.UUID, threshold: float | None) -> dict[str, Any]:
    """Give the model the calibrated threshold unless it has one by now (a fine-tune's, or an earlier
    calibration's): one conditional UPDATE, so two calibrations never overwrite each other."""
    statement = (
        update(ModelVersion)
        .where(ModelVersion.id == model_id, ModelVersion.threshold.is_(None))
        .values(threshold=threshold)
        .returning(ModelVersion.id)
    )
    stored = threshold is not None and session.execute(statement).first() is not None
    return {"threshold": threshold, "stored": stored}
