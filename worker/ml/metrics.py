"""Verification metrics for scored pairs (numpy only).

A pair is predicted "same" when its score is at or above the threshold. Scores are sorted once and every
threshold-sweeping metric reads the same ROC vertices, so a call is O(n log n) however many metrics it
reports. A value that is undefined for the data (no pairs, no positives, no negatives, precision with no
predicted positive, F1 without precision or recall) is ``None``, never 0. Every number returned is a plain
``int``/``float``, so results go straight into JSON.

Definitions where the literature varies:

- ROC AUC is the trapezoidal area under the ROC vertices, i.e. the Mann-Whitney statistic with ties counting
  half (what ``sklearn.metrics.roc_auc_score`` computes).
- EER is where FAR and FRR cross, linearly interpolated along the ROC segment on which FRR − FAR changes sign;
  ``eer_threshold`` is the real threshold (a score) of the vertex next to that crossing with the smaller
  |FAR − FRR|, which is also the threshold minimising |FAR − FRR| overall (the lower one on a tie).
- TAR at FAR f is the highest TAR among thresholds whose FAR ≤ f; among thresholds reaching that TAR, the
  one with the lowest FAR (the highest threshold) is reported. When only rejecting every pair stays under f,
  TAR and FAR are 0 and the threshold is the smallest float above the top score. ``enough_negatives`` says
  whether N_neg ≥ 3 / f, the fewest negatives for which FAR ≤ f is more than one lucky pair.
- ``roc`` is the curve for drawing, not for computing: at most ``ROC_POINTS`` vertices (FAR, TAR) from
  (0, 0) to (1, 1), every vertex when there are that few, else the first vertex at or past each of
  ``ROC_POINTS`` even steps along FAR + TAR (which grows at every vertex), so a steep start gets as many
  points as a long flat tail. Rounded to ``ROC_DECIMALS``: a stored evaluation stays a few kilobytes.
- The best-accuracy threshold sits midway between the lowest accepted score and the next lower score, so it
  does not sit on a training score; among equally accurate thresholds the one closest to the EER point
  (smallest |FAR − FRR|) wins, then the higher one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

FAR_TARGETS: tuple[float, ...] = (1e-1, 1e-2, 1e-3)
FIXED_THRESHOLD = 0.4  # the original library's threshold, still reported for comparison
MIN_NEGATIVES_PER_FAR = 3
ROC_POINTS = 100
ROC_DECIMALS = 4


@dataclass(frozen=True)
class _Roc:
    """ROC vertices from the strictest threshold (reject all) to the loosest (accept all)."""

    thresholds: np.ndarray  # float64 [K+1]; [0] is +inf (reject all), then distinct scores descending
    tp: np.ndarray  # int64 [K+1]: positives accepted at each threshold
    fp: np.ndarray  # int64 [K+1]: negatives accepted
    positives: int
    negatives: int

    @property
    def imbalance(self) -> np.ndarray:
        """(FRR − FAR) · P · N as exact integers: strictly decreasing, so its sign change locates the EER."""
        return (self.positives - self.tp) * self.negatives - self.fp * self.positives

    def above_top_score(self) -> float:
        return float(np.nextafter(self.thresholds[1], np.inf))


def _as_arrays(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores for {y.size} labels")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite numbers")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (different) or 1 (same)")
    return s, y.astype(bool)


def _roc(scores: np.ndarray, labels: np.ndarray) -> _Roc:
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    last_of_value = np.flatnonzero(np.diff(sorted_scores) != 0)
    ends = np.append(last_of_value, scores.size - 1)
    tp = np.cumsum(labels[order], dtype=np.int64)[ends]
    fp = (ends + 1) - tp
    return _Roc(
        thresholds=np.concatenate(([np.inf], sorted_scores[ends])),
        tp=np.concatenate(([0], tp)),
        fp=np.concatenate(([0], fp)),
        positives=int(labels.sum()),
        negatives=int(scores.size - labels.sum()),
    )


def _at_threshold(scores: np.ndarray, labels: np.ndarray, threshold: float | None) -> dict[str, Any]:
    keys = ("accuracy", "precision", "recall", "f1", "tp", "fp", "tn", "fn")
    if threshold is None:
        return {"threshold": None, **dict.fromkeys(keys)}
    accepted = scores >= threshold
    tp = int(np.count_nonzero(accepted & labels))
    fp = int(np.count_nonzero(accepted & ~labels))
    fn = int(np.count_nonzero(labels)) - tp
    tn = scores.size - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = None
    if precision is not None and recall is not None:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "threshold": float(threshold),
        "accuracy": (tp + tn) / scores.size if scores.size else None,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def _roc_auc(roc: _Roc) -> float:
    tar = roc.tp / roc.positives
    far = roc.fp / roc.negatives
    return float(np.sum(np.diff(far) * (tar[1:] + tar[:-1])) / 2)


def _roc_points(roc: _Roc, max_points: int = ROC_POINTS) -> dict[str, list[float]]:
    """The ROC downsampled for drawing (see the module's docstring): {"far": [...], "tar": [...]}."""
    if max_points < 2:
        raise ValueError("a curve needs at least its two ends")
    far = roc.fp / roc.negatives
    tar = roc.tp / roc.positives
    if far.size > max_points:
        travelled = far + tar  # strictly increasing from 0 to 2: each vertex accepts more pairs
        keep = np.unique(np.searchsorted(travelled, np.linspace(0.0, 2.0, max_points), side="left"))
        far, tar = far[keep], tar[keep]
    return {
        "far": [round(float(v), ROC_DECIMALS) for v in far],
        "tar": [round(float(v), ROC_DECIMALS) for v in tar],
    }


def _eer(roc: _Roc) -> tuple[float, float]:
    d = roc.imbalance
    k = int(np.searchsorted(-d, 0, side="left"))  # first vertex with FAR ≥ FRR; d[0] = P·N > 0, d[-1] < 0
    far = roc.fp / roc.negatives
    alpha = d[k - 1] / (d[k - 1] - d[k])
    eer = far[k - 1] + alpha * (far[k] - far[k - 1])
    nearest = k if abs(d[k]) <= abs(d[k - 1]) else k - 1
    return float(eer), float(roc.thresholds[nearest])


def _tar_at_far(roc: _Roc, far_target: float) -> dict[str, Any]:
    enough = roc.negatives * far_target >= MIN_NEGATIVES_PER_FAR * (1 - 1e-9)
    result: dict[str, Any] = {
        "far_target": float(far_target),
        "tar": None,
        "far": None,
        "threshold": None,
        "enough_negatives": bool(enough),
    }
    if not roc.positives or not roc.negatives:
        return result
    max_fp = int(np.floor(far_target * roc.negatives + 1e-9))
    last = int(np.searchsorted(roc.fp, max_fp, side="right")) - 1
    best = int(np.searchsorted(roc.tp, roc.tp[last], side="left"))
    threshold = roc.above_top_score() if best == 0 else float(roc.thresholds[best])
    result.update(
        tar=float(roc.tp[best] / roc.positives),
        far=float(roc.fp[best] / roc.negatives),
        threshold=threshold,
    )
    return result


def _best_accuracy(roc: _Roc, pairs: int) -> tuple[float, float]:
    """(threshold, accuracy) of the most accurate threshold, placed and tie-broken as the module says."""
    correct = roc.tp + (roc.negatives - roc.fp)
    candidates = np.flatnonzero(correct == correct.max())
    k = int(candidates[np.argmin(np.abs(roc.imbalance[candidates]))])
    if k == 0:
        threshold = roc.above_top_score()
    elif k == roc.thresholds.size - 1:
        threshold = float(roc.thresholds[k])
    else:
        accepted, rejected = roc.thresholds[k], roc.thresholds[k + 1]
        midpoint = (accepted + rejected) / 2
        threshold = float(midpoint if midpoint > rejected else accepted)
    return threshold, float(correct[k] / pairs)


def pair_metrics(
    scores: ArrayLike,
    labels: ArrayLike,
    threshold: float | None,
    *,
    far_targets: tuple[float, ...] = FAR_TARGETS,
) -> dict[str, Any]:
    """Everything a report shows about a set of scored pairs (label 1 = same person), JSON-ready."""
    s, y = _as_arrays(scores, labels)
    positives = int(y.sum())
    negatives = int(y.size - positives)
    both_classes = positives > 0 and negatives > 0
    roc = _roc(s, y) if both_classes else None
    eer, eer_threshold = _eer(roc) if roc else (None, None)
    best_threshold, best_accuracy = _best_accuracy(roc, s.size) if roc else (None, None)
    empty_roc = _Roc(np.array([np.inf]), np.zeros(1, np.int64), np.zeros(1, np.int64), positives, negatives)
    return {
        "counts": {"pairs": int(s.size), "positives": positives, "negatives": negatives},
        "at_threshold": _at_threshold(s, y, threshold),
        "at_0_4": _at_threshold(s, y, FIXED_THRESHOLD),
        "roc_auc": _roc_auc(roc) if roc else None,
        "roc": _roc_points(roc) if roc else None,
        "eer": eer,
        "eer_threshold": eer_threshold,
        "tar_at_far": [_tar_at_far(roc or empty_roc, f) for f in far_targets],
        "best_accuracy": {"threshold": best_threshold, "accuracy": best_accuracy},
        "mean_score": {
            "positive": float(s[y].mean()) if positives else None,
            "negative": float(s[~y].mean()) if negatives else None,
        },
    }


def calibrate_threshold(scores: ArrayLike, labels: ArrayLike) -> float | None:
    """The best-accuracy threshold on these (validation) pairs; None when either class is missing."""
    s, y = _as_arrays(scores, labels)
    if not y.any() or y.all():
        return None
    threshold, _ = _best_accuracy(_roc(s, y), s.size)
    return threshold
