"""Scoring labelled pairs with a model, and a model against its parent on the same pairs."""

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from worker.ml.bootstrap import BootstrapConfig, paired_bootstrap
from worker.ml.embedding import embed_pixels
from worker.ml.metrics import pair_metrics
from worker.ml.pairs import IndexedPairs
from worker.ml.preprocessing import PreprocessSpec


@dataclass
class ModelUnderTest:
    """A model with what it takes to score it: its preprocessing and its own decision threshold."""

    model: nn.Module
    spec: PreprocessSpec
    threshold: float | None
    threshold_source: str = "model"


def score_pairs(
    model: nn.Module,
    spec: PreprocessSpec,
    pairs: IndexedPairs,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Cosine similarity per pair (float64 [P]); each distinct image is embedded once."""
    if len(pairs) == 0:
        return np.zeros(0, dtype=np.float64)
    used, inverse = torch.unique(torch.cat([pairs.first, pairs.second]), return_inverse=True)
    pixels = pairs.pixels if used.numel() == pairs.pixels.shape[0] else pairs.pixels[used]
    first, second = inverse[: len(pairs)], inverse[len(pairs) :]
    embeddings = embed_pixels(model, spec, pixels, batch_size=batch_size, device=device).embeddings
    return (embeddings[first] * embeddings[second]).sum(dim=1).double().numpy()


def evaluate(
    model: nn.Module,
    spec: PreprocessSpec,
    pairs: IndexedPairs,
    threshold: float | None,
    *,
    threshold_source: str = "model",
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """pair_metrics at the model's threshold, with where that threshold came from (e.g. "val", "model")."""
    scores = score_pairs(model, spec, pairs, batch_size=batch_size, device=device)
    return _metrics(scores, pairs, threshold, threshold_source)


def compare_models(
    baseline: ModelUnderTest,
    candidate: ModelUnderTest,
    pairs: IndexedPairs,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    bootstrap: BootstrapConfig | None = None,
) -> dict[str, Any]:
    """Both models on the same pairs, each at its own threshold, and candidate − baseline deltas.

    Deltas are None where either side is undefined. Positive `roc_auc` and `accuracy` deltas and a negative
    `eer` delta mean the candidate is better. With `bootstrap`, `intervals` holds the paired bootstrap of
    the differences, resampling the pairs' faces (worker.ml.bootstrap); else it is None.
    """
    results, scores = {}, {}
    for role, entry in (("baseline", baseline), ("candidate", candidate)):
        scores[role] = score_pairs(entry.model, entry.spec, pairs, batch_size=batch_size, device=device)
        results[role] = _metrics(scores[role], pairs, entry.threshold, entry.threshold_source)
    base, cand = results["baseline"], results["candidate"]
    deltas = {
        "roc_auc": _delta(cand["roc_auc"], base["roc_auc"]),
        "eer": _delta(cand["eer"], base["eer"]),
        "accuracy": _delta(cand["at_threshold"]["accuracy"], base["at_threshold"]["accuracy"]),
    }
    intervals = None
    if bootstrap is not None:
        intervals = paired_bootstrap(
            scores["baseline"],
            scores["candidate"],
            pairs.labels.numpy(),
            pairs.first.numpy(),
            pairs.second.numpy(),
            bootstrap,
        )
    return {"baseline": base, "candidate": cand, "deltas": deltas, "intervals": intervals}


def _metrics(
    scores: np.ndarray, pairs: IndexedPairs, threshold: float | None, threshold_source: str
) -> dict[str, Any]:
    metrics = pair_metrics(scores, pairs.labels.numpy(), threshold)
    metrics["threshold_source"] = threshold_source if threshold is not None else None
    return metrics


def _delta(new: float | None, old: float | None) -> float | None:
    return None if new is None or old is None else float(new) - float(old)
