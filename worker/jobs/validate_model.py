"""validate_model: a registered checkpoint becomes usable only after it loads strictly into its architecture.

An uploaded file is untrusted and its stated architecture may be wrong; loading it strictly (every tensor
present, every shape equal, nothing extra) and running one forward pass is what makes `ready` mean something.
When it does not fit, the model is marked `invalid` with the loader's one-sentence reason, which names the
architecture the file does fit when there is one, so the operator knows what to register instead.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

import torch
from sqlalchemy import update

from app.domain import ModelStatus
from app.models.service import drop_checkpoint_if_unused
from app.tables import ModelVersion, utcnow
from worker.jobs.registry import blob_store, checkpoint_path
from worker.ml.backbones import embedding_size
from worker.ml.checkpoints import CheckpointError, LoadedBackbone, load_backbone
from worker.ml.preprocessing import PreprocessSpec, model_preprocess_spec
from worker.runtime import JobContext, JobFailed


def _model_id(ctx: JobContext) -> uuid.UUID:
    try:
        return uuid.UUID(str(ctx.params["model"]))
    except (KeyError, ValueError):
        raise JobFailed("invalid-job-params", "Invalid job parameters", "params.model: a model id") from None


def _smoke_test(loaded: LoadedBackbone, spec: PreprocessSpec) -> int:
    """One forward pass on a blank crop: the output must be one finite vector of the expected size."""
    with torch.inference_mode():
        output = loaded.model(torch.zeros(1, 3, spec.size, spec.size)).flatten(1)
    size = embedding_size(loaded.arch)
    if tuple(output.shape) != (1, size):
        raise CheckpointError(f"the network produced shape {tuple(output.shape)}, not a {size}-d embedding")
    if not bool(torch.isfinite(output).all()):
        raise CheckpointError("the network produced non-finite values (NaN or infinity) from a blank crop")
    return size


def _threshold(metadata: dict[str, Any]) -> float | None:
    value = metadata.get("threshold")
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _mark(ctx: JobContext, model_id: uuid.UUID, *, drop_sha256: str | None = None, **values: Any) -> None:
    """Record the outcome; with `drop_sha256`, in the same transaction delete the refused file's bytes
    unless another model still needs them, so nothing the strict load refused stays downloadable."""
    with ctx.session() as session:
        session.execute(
            update(ModelVersion)
            .where(ModelVersion.id == model_id)
            .values(validated_at=utcnow(), **values)
            .execution_options(synchronize_session=False)
        )
        if drop_sha256 is not None:
            drop_checkpoint_if_unused(session, blob_store(ctx.settings), drop_sha256)


def run(ctx: JobContext) -> dict[str, Any]:
    model_id = _model_id(ctx)
    with ctx.session() as session:
        row = session.get(ModelVersion, model_id)
        if row is None:
            raise JobFailed("unknown-model", "Unknown model", f"no model with id {model_id}")
        arch, sha256 = row.arch, row.sha256
    ctx.progress(phase="loading", force=True)
    try:
        loaded = load_backbone(checkpoint_path(ctx.settings, sha256), arch)
        if loaded.sha256 != sha256:
            raise CheckpointError(f"the stored file's sha256 is {loaded.sha256}, not the registered {sha256}")
        spec = model_preprocess_spec(arch, loaded.metadata.get("preprocess"))
        size = _smoke_test(loaded, spec)
    except ValueError as exc:  # CheckpointError, or an architecture the loader does not know
        _mark(ctx, model_id, drop_sha256=sha256, status=ModelStatus.INVALID, status_reason=str(exc))
        raise JobFailed("invalid-checkpoint", "Invalid checkpoint", str(exc)) from exc
    threshold = _threshold(loaded.metadata)
    found = {"threshold": threshold} if threshold is not None else {}
    _mark(
        ctx,
        model_id,
        status=ModelStatus.READY,
        status_reason=None,
        embedding_size=size,
        preprocess=spec.to_dict(),
        **found,
    )
    return {
        "model_id": str(model_id),
        "status": ModelStatus.READY,
        "arch": arch,
        "sha256": sha256,
        "embedding_size": size,
        "preprocess": spec.to_dict(),
        "threshold": threshold,
        "epoch": loaded.epoch,
    }
