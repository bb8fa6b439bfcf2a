"""Paired bootstrap of a candidate against its parent on the same scored pairs, resampling faces (numpy only).

Pairs that share a face are not independent: a face the model gets wrong drags every pair naming it. So the
unit of resampling is the face (a cluster bootstrap): each replicate draws the faces with replacement and
keeps every pair whose two faces were both drawn, weighted by the product of their multiplicities (a face
drawn twice and another drawn three times contribute their pair six times). Both models are scored on the
same replicate, so the interval is on the paired difference, candidate − parent.

Each replicate's AUC, EER and TAR@FAR are computed from weighted ROC vertices, vectorised over a block of
replicates (no Python loop per replicate): B = 1000 on thousands of pairs takes a fraction of a second. With
unit weights they equal `worker.ml.metrics.pair_metrics` (ties count half in AUC; EER interpolated where
FRR − FAR changes sign; TAR at the highest threshold set whose FAR ≤ f). A replicate that draws no same or
no different pair leaves every figure undefined and is dropped; `valid` counts the rest, and an interval
needs at least half of the replicates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

FIGURES: tuple[str, ...] = ("roc_auc", "eer", "tar_at_far_1e_2")
TAR_FAR = 1e-2
BLOCK_ELEMENTS = 4_000_000  # replicate × pair cells per block: bounds memory to tens of MB


@dataclass(frozen=True)
class BootstrapConfig:
    samples: int = 1000
    seed: int = 0
    confidence: float = 0.95


def _weighted_figures(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """AUC, EER and TAR@FAR=1e-2 per row of `weights` [B, P]; NaN where a class has no weight."""
    order = np.argsort(-scores, kind="stable")
    s, y, w = scores[order], labels[order], weights[:, order]
    group_starts = np.flatnonzero(np.r_[True, np.diff(s) != 0])  # distinct scores, descending
    pos = np.add.reduceat(w * y, group_starts, axis=1)  # weight of same pairs at each distinct score
    neg = np.add.reduceat(w, group_starts, axis=1) - pos
    total_pos, total_neg = pos.sum(axis=1), neg.sum(axis=1)
    defined = (total_pos > 0) & (total_neg > 0)
    safe_pos = np.where(defined, total_pos, 1.0)[:, None]
    safe_neg = np.where(defined, total_neg, 1.0)[:, None]
    zero = np.zeros((w.shape[0], 1))
    tar = np.concatenate([zero, np.cumsum(pos, axis=1)], axis=1) / safe_pos  # accept-none, then each score
    far = np.concatenate([zero, np.cumsum(neg, axis=1)], axis=1) / safe_neg
    auc = (np.diff(far, axis=1) * (tar[:, 1:] + tar[:, :-1])).sum(axis=1) / 2

    gap = (1 - tar) - far  # FRR − FAR: from 1 down to −1, non-increasing
    k = np.argmax(gap <= 0, axis=1)  # first vertex with FAR ≥ FRR (k ≥ 1 where defined)
    k = np.maximum(k, 1)
    rows = np.arange(w.shape[0])
    d0, d1 = gap[rows, k - 1], gap[rows, k]
    denominator = np.where(d0 - d1 == 0, 1.0, d0 - d1)
    alpha = np.where(d0 - d1 == 0, 0.0, d0 / denominator)
    eer = far[rows, k - 1] + alpha * (far[rows, k] - far[rows, k - 1])

    within = far <= TAR_FAR + 1e-12
    tar_at_far = np.where(within, tar, 0.0).max(axis=1)

    nan = np.full(w.shape[0], np.nan)
    return {
        "roc_auc": np.where(defined, auc, nan),
        "eer": np.where(defined, eer, nan),
        "tar_at_far_1e_2": np.where(defined, tar_at_far, nan),
    }


def face_counts(first: np.ndarray, second: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """How often each face is drawn in each replicate: [samples, faces], each row summing to `faces`."""
    faces = int(max(first.max(), second.max())) + 1
    rng = np.random.default_rng(seed)
    return rng.multinomial(faces, np.full(faces, 1.0 / faces), size=samples).astype(np.float64)


def paired_bootstrap(
    parent_scores: ArrayLike,
    candidate_scores: ArrayLike,
    labels: ArrayLike,
    first: ArrayLike,
    second: ArrayLike,
    config: BootstrapConfig = BootstrapConfig(),
) -> dict[str, Any]:
    """Percentile intervals of candidate − parent for AUC, EER and TAR@FAR=1e-2, resampling faces.

    `first`/`second` give each pair's two faces as indices. Returns, per figure, `estimate` (the difference on
    the pairs as they are), `low` and `high` (None when undefined), and the bootstrap's settings. A positive
    AUC or TAR difference and a negative EER difference favour the candidate.
    """
    parent = np.asarray(parent_scores, dtype=np.float64).reshape(-1)
    candidate = np.asarray(candidate_scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    a = np.asarray(first, dtype=np.int64).reshape(-1)
    b = np.asarray(second, dtype=np.int64).reshape(-1)
    if not parent.shape == candidate.shape == y.shape == a.shape == b.shape:
        raise ValueError("scores, labels and faces must name the same pairs")
    report: dict[str, Any] = {
        "method": "paired percentile bootstrap, resampling faces",
        "samples": config.samples,
        "seed": config.seed,
        "confidence": config.confidence,
        "pairs": int(y.size),
        "faces": int(np.unique(np.concatenate([a, b])).size),
        "valid": 0,
    }
    if y.size == 0 or not (y == 1).any() or not (y == 0).any():
        report.update({figure: _interval(None, None, None) for figure in FIGURES})
        return report
    ones = np.ones((1, y.size))
    estimate = {
        key: float(_weighted_figures(candidate, y, ones)[key][0] - _weighted_figures(parent, y, ones)[key][0])
        for key in FIGURES
    }
    counts = face_counts(a, b, config.samples, config.seed)
    block = max(1, BLOCK_ELEMENTS // max(1, y.size))
    differences: dict[str, list[np.ndarray]] = {key: [] for key in FIGURES}
    for start in range(0, config.samples, block):
        drawn = counts[start : start + block]
        weights = drawn[:, a] * drawn[:, b]
        scored_c = _weighted_figures(candidate, y, weights)
        scored_p = _weighted_figures(parent, y, weights)
        for key in FIGURES:
            differences[key].append(scored_c[key] - scored_p[key])
    tail = (1 - config.confidence) / 2 * 100
    for key in FIGURES:
        values = np.concatenate(differences[key])
        values = values[~np.isnan(values)]
        report["valid"] = int(values.size)
        if values.size * 2 < config.samples:
            report[key] = _interval(estimate[key], None, None)
            continue
        low, high = np.percentile(values, [tail, 100 - tail])
        report[key] = _interval(estimate[key], float(low), float(high))
    return report


def _interval(estimate: float | None, low: float | None, high: float | None) -> dict[str, float | None]:
    return {"estimate": estimate, "low": low, "high": high}
