"""Registry rows as the jobs use them: load a ready model's checkpoint, pick its threshold, record scores."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session
from torch import nn

from app.blobs import BlobStore
from app.config import Settings
from app.domain import ModelStatus
from app.tables import Evaluation, ModelVersion
from worker.jobs.data import FeedbackRow, pairs_sha256
from worker.ml.checkpoints import CheckpointError, load_backbone
from worker.ml.evaluation import ModelUnderTest
from worker.ml.metrics import calibrate_threshold
from worker.ml.pairs import IndexedPairs
from worker.ml.preprocessing import PreprocessSpec, model_preprocess_spec
from worker.runtime import JobFailed


@dataclass
class LoadedModel:
    """A ready model's row facts and its backbone (eval mode, CPU)."""

    id: uuid.UUID
    name: str | None
    arch: str
    sha256: str
    threshold: float | None
    spec: PreprocessSpec
    backbone: nn.Module
    metadata: dict[str, Any] = field(default_factory=dict)  # the checkpoint's own (our `magtune` entry)

    def under_test(self, threshold: float | None, source: str) -> ModelUnderTest:
        return ModelUnderTest(self.backbone, self.spec, threshold, source)


def blob_store(settings: Settings) -> BlobStore:
    return BlobStore(settings.blob_dir)


def checkpoint_path(settings: Settings, sha256: str) -> Path:
    return blob_store(settings).path("checkpoints", sha256)


def model_row(session: Session, model_id: uuid.UUID | str | None, *, role: str = "model") -> ModelVersion:
    """The registry row, which must be ready; JobFailed otherwise."""
    try:
        key = uuid.UUID(str(model_id))
    except ValueError:
        raise JobFailed("unknown-model", "Unknown model", f"{role}: {model_id!r} is not a model id") from None
    row = session.get(ModelVersion, key)
    if row is None:
        raise JobFailed("unknown-model", "Unknown model", f"{role}: no model with id {key}")
    if row.status != ModelStatus.READY:
        reason = f" ({row.status_reason})" if row.status_reason else ""
        raise JobFailed("model-not-ready", "Model not ready", f"{role}: model {key} is {row.status}{reason}")
    return row


def load_model(settings: Settings, row: ModelVersion) -> LoadedModel:
    """Load a registered checkpoint strictly; a file that no longer loads fails the job, it is not guessed."""
    try:
        loaded = load_backbone(checkpoint_path(settings, row.sha256), row.arch)
    except CheckpointError as exc:
        raise JobFailed("invalid-checkpoint", "Invalid checkpoint", f"model {row.id}: {exc}") from exc
    spec = model_preprocess_spec(row.arch, row.preprocess)
    return LoadedModel(
        row.id, row.name, row.arch, row.sha256, row.threshold, spec, loaded.model, metadata=loaded.metadata
    )


def threshold_for(
    model: LoadedModel, val: IndexedPairs | None, *, device: Any = None, val_scores: np.ndarray | None = None
) -> tuple[float | None, str | None]:
    """(threshold, source): the model's stored threshold ("model"), else one calibrated on val ("val")."""
    if model.threshold is not None:
        return model.threshold, "model"
    threshold = calibrated_threshold(model, val, device=device, val_scores=val_scores)
    return threshold, ("val" if threshold is not None else None)


def calibrated_threshold(
    model: LoadedModel, val: IndexedPairs | None, *, device: Any = None, val_scores: np.ndarray | None = None
) -> float | None:
    """The best-accuracy threshold of the model on the val pairs, as a fine-tune calibrates its checkpoint's;
    None when val lacks same or different pairs. `val_scores`, the model's scores on those pairs when the
    caller has them already (a fine-tune's epoch 0), saves embedding val again."""
    if val is None or len(val) == 0:
        return None
    if val_scores is None:
        from worker.ml.evaluation import score_pairs

        val_scores = score_pairs(model.backbone, model.spec, val, device=device)
    return calibrate_threshold(val_scores, val.labels.numpy())


def record_evaluation(
    session: Session,
    *,
    model_id: uuid.UUID,
    job_id: uuid.UUID,
    split: str,
    rows: list[FeedbackRow],
    metrics: dict[str, Any],
) -> Evaluation:
    evaluation = Evaluation(
        model_id=model_id,
        job_id=job_id,
        split=split,
        pairs_sha256=pairs_sha256(rows),
        pair_count=len(rows),
        threshold=metrics.get("at_threshold", {}).get("threshold"),
        metrics=metrics,
    )
    session.add(evaluation)
    session.flush()
    return evaluation
