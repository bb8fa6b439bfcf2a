"""A candidate against its parent on the same pair sets, each score recorded as an Evaluation row."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import torch

from app.config import Settings
from worker.jobs.data import FeedbackRow
from worker.jobs.registry import record_evaluation
from worker.ml.bootstrap import BootstrapConfig
from worker.ml.evaluation import ModelUnderTest, compare_models
from worker.ml.pairs import IndexedPairs
from worker.runtime import JobContext


def bootstrap_config(settings: Settings) -> BootstrapConfig:
    """The gate's bootstrap as the settings name it (resamples, seed; 95% intervals)."""
    return BootstrapConfig(samples=settings.gate_bootstrap_samples, seed=settings.gate_bootstrap_seed)


def compare_on(
    ctx: JobContext,
    *,
    parent: ModelUnderTest,
    candidate: ModelUnderTest,
    ids: tuple[uuid.UUID, uuid.UUID],
    pair_sets: Mapping[str, tuple[list[FeedbackRow], IndexedPairs]],
    device: torch.device | None = None,
    bootstrap: BootstrapConfig | None = None,
) -> dict[str, dict[str, Any]]:
    """{set name: {parent: entry, candidate: entry, deltas, intervals}}; an entry is what its Evaluation
    row holds, `intervals` the paired bootstrap of the differences (None without `bootstrap`).

    Both models are scored on exactly the same pairs (same `pairs_sha256`), each at its own threshold.
    """
    report: dict[str, dict[str, Any]] = {}
    for name, (rows, pairs) in pair_sets.items():
        scored = compare_models(parent, candidate, pairs, device=device, bootstrap=bootstrap)
        entries: dict[str, Any] = {"deltas": scored["deltas"], "intervals": scored["intervals"]}
        with ctx.session() as session:
            for role, model_id, metrics in (
                ("parent", ids[0], scored["baseline"]),
                ("candidate", ids[1], scored["candidate"]),
            ):
                row = record_evaluation(
                    session, model_id=model_id, job_id=ctx.job.id, split=name, rows=rows, metrics=metrics
                )
                entries[role] = {
                    "model_id": str(model_id),
                    "evaluation_id": str(row.id),
                    "pairs_sha256": row.pairs_sha256,
                    "pair_count": row.pair_count,
                    "threshold": row.threshold,
                    "threshold_source": metrics.get("threshold_source"),
                    "metrics": metrics,
                }
        report[name] = entries
    return report
