import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score, roc_curve

from worker.ml.metrics import FAR_TARGETS, ROC_POINTS, calibrate_threshold, pair_metrics


def _dataset(kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind == "random":
        labels = rng.integers(0, 2, 2000)
        scores = rng.normal(size=2000) * 0.3 + labels * 0.4
    elif kind == "tied":
        labels = rng.integers(0, 2, 2000)
        scores = np.round(rng.normal(size=2000) * 0.3 + labels * 0.4, 1)
    elif kind == "small":
        labels = np.array([1, 0, 1, 1, 0, 0, 1])
        scores = rng.uniform(-1, 1, size=7)
    elif kind == "imbalanced":
        labels = (rng.uniform(size=5000) < 0.05).astype(int)
        scores = np.round(rng.uniform(-1, 1, 5000) + labels * 0.8, 2).astype(np.float32)
    else:
        raise AssertionError(kind)
    return scores, labels


KINDS = ["random", "tied", "small", "imbalanced"]


def _brute_force_eer(labels: np.ndarray, scores: np.ndarray) -> float:
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    gap = (1 - tpr) - fpr
    for i in range(1, len(gap)):
        if gap[i - 1] > 0 >= gap[i]:
            share = gap[i - 1] / (gap[i - 1] - gap[i])
            return fpr[i - 1] + share * (fpr[i] - fpr[i - 1])
    raise AssertionError("FAR and FRR never cross")


def _operating_points(scores: np.ndarray, labels: np.ndarray) -> list[tuple[float, float, float]]:
    """(threshold, TAR, FAR) at every threshold that changes a decision, including reject-all."""
    positives, negatives = scores[labels == 1], scores[labels == 0]
    points = []
    for t in [np.inf, *np.unique(scores)]:
        points.append((t, float(np.mean(positives >= t)), float(np.mean(negatives >= t))))
    return points


def _plain_json_types(value: object) -> bool:
    if isinstance(value, dict):
        return all(type(k) is str and _plain_json_types(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain_json_types(v) for v in value)
    return value is None or type(value) in (int, float, bool, str)


@pytest.mark.parametrize("kind", KINDS)
def test_threshold_metrics_match_sklearn(kind: str) -> None:
    scores, labels = _dataset(kind)
    for threshold in (0.1, 0.4, float(np.median(scores))):
        metrics = pair_metrics(scores, labels, threshold)
        at = metrics["at_threshold"]
        predicted = (scores >= threshold).astype(int)
        assert at["threshold"] == threshold
        assert at["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
        assert at["precision"] == pytest.approx(precision_score(labels, predicted))
        assert at["recall"] == pytest.approx(recall_score(labels, predicted))
        assert at["f1"] == pytest.approx(f1_score(labels, predicted))
        assert at["tp"] == int(np.sum((predicted == 1) & (labels == 1)))
        assert at["fp"] + at["tn"] == int(np.sum(labels == 0))
        assert at["tp"] + at["fn"] == int(np.sum(labels == 1))
    at_0_4 = pair_metrics(scores, labels, None)["at_0_4"]
    assert at_0_4["threshold"] == 0.4
    assert at_0_4["accuracy"] == pytest.approx(accuracy_score(labels, (scores >= 0.4).astype(int)))


@pytest.mark.parametrize("kind", KINDS)
def test_roc_auc_matches_sklearn_with_ties_counting_half(kind: str) -> None:
    scores, labels = _dataset(kind)
    assert pair_metrics(scores, labels, 0.4)["roc_auc"] == pytest.approx(
        roc_auc_score(labels, scores), abs=1e-12
    )


def test_all_tied_scores_give_auc_one_half() -> None:
    metrics = pair_metrics(np.full(10, 0.3), [1, 0] * 5, 0.4)
    assert metrics["roc_auc"] == pytest.approx(0.5)


@pytest.mark.parametrize("kind", KINDS)
def test_eer_matches_brute_force_crossing_of_the_roc_curve(kind: str) -> None:
    scores, labels = _dataset(kind)
    metrics = pair_metrics(scores, labels, 0.4)
    assert metrics["eer"] == pytest.approx(_brute_force_eer(labels, scores), abs=1e-12)
    gaps = {t: abs((1 - tar) - far) for t, tar, far in _operating_points(scores, labels)}
    assert gaps[metrics["eer_threshold"]] == pytest.approx(min(gaps.values()), abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_tar_at_far_matches_brute_force_over_all_thresholds(kind: str) -> None:
    scores, labels = _dataset(kind)
    points = _operating_points(scores, labels)
    negatives = int(np.sum(labels == 0))
    reported = pair_metrics(scores, labels, 0.4)["tar_at_far"]
    assert [entry["far_target"] for entry in reported] == list(FAR_TARGETS)
    for entry in reported:
        target = entry["far_target"]
        allowed = [p for p in points if p[2] <= target]
        best_tar = max(p[1] for p in allowed)
        threshold, tar, far = min((p for p in allowed if p[1] == best_tar), key=lambda p: p[2])
        assert entry["tar"] == pytest.approx(tar)
        assert entry["far"] == pytest.approx(far)
        assert entry["far"] <= target
        if np.isinf(threshold):
            assert entry["threshold"] > scores.max()
        else:
            assert entry["threshold"] == threshold
        assert entry["enough_negatives"] == (negatives >= 3 / target - 1e-6)


def test_tar_is_zero_when_only_rejecting_everything_keeps_far_low() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.2, 0.1])
    labels = np.array([0, 1, 1, 0, 0])
    entry = pair_metrics(scores, labels, 0.5)["tar_at_far"][0]
    assert entry["tar"] == 0.0 and entry["far"] == 0.0
    assert entry["threshold"] > 0.9
    assert entry["enough_negatives"] is False


def test_enough_negatives_needs_three_over_far() -> None:
    def flags(negatives: int) -> list[bool]:
        labels = np.array([1] * 5 + [0] * negatives)
        scores = np.linspace(0, 1, labels.size)
        return [e["enough_negatives"] for e in pair_metrics(scores, labels, 0.5)["tar_at_far"]]

    assert flags(30) == [True, False, False]
    assert flags(29) == [False, False, False]
    assert flags(300) == [True, True, False]
    assert flags(3000) == [True, True, True]


@pytest.mark.parametrize("kind", KINDS)
def test_calibrated_threshold_reaches_the_best_brute_force_accuracy(kind: str) -> None:
    scores, labels = _dataset(kind)
    best = max(
        float(np.mean((scores >= t) == (labels == 1))) for t, _, _ in _operating_points(scores, labels)
    )
    threshold = calibrate_threshold(scores, labels)
    assert threshold is not None
    assert float(np.mean((scores >= threshold) == (labels == 1))) == pytest.approx(best)
    best_accuracy = pair_metrics(scores, labels, threshold)["best_accuracy"]
    assert best_accuracy == {"threshold": threshold, "accuracy": pytest.approx(best)}


def test_calibrated_threshold_sits_midway_between_neighbouring_scores() -> None:
    scores = np.array([0.9, 0.7, 0.3, 0.1])
    labels = np.array([1, 1, 0, 0])
    assert calibrate_threshold(scores, labels) == pytest.approx(0.5)


def test_one_class_inputs_leave_class_dependent_metrics_undefined() -> None:
    scores = np.array([0.9, 0.5, 0.2, 0.45])
    only_same = pair_metrics(scores, np.ones(4, dtype=int), 0.4)
    assert only_same["counts"] == {"pairs": 4, "positives": 4, "negatives": 0}
    assert only_same["roc_auc"] is None and only_same["eer"] is None and only_same["eer_threshold"] is None
    assert only_same["best_accuracy"] == {"threshold": None, "accuracy": None}
    assert all(e["tar"] is None and e["far"] is None for e in only_same["tar_at_far"])
    at = only_same["at_threshold"]
    predicted = (scores >= 0.4).astype(int)
    assert at["precision"] == pytest.approx(precision_score(np.ones(4, dtype=int), predicted))
    assert at["recall"] == pytest.approx(recall_score(np.ones(4, dtype=int), predicted))
    assert at["accuracy"] == pytest.approx(0.75)

    only_different = pair_metrics(scores, np.zeros(4, dtype=int), 0.4)
    at = only_different["at_threshold"]
    assert at["recall"] is None and at["f1"] is None
    assert at["precision"] == precision_score(np.zeros(4, dtype=int), predicted, zero_division=np.nan) == 0.0
    assert at["accuracy"] == pytest.approx(0.25)
    assert only_different["roc_auc"] is None
    assert calibrate_threshold(scores, np.zeros(4, dtype=int)) is None
    assert calibrate_threshold(scores, np.ones(4, dtype=int)) is None


def test_precision_without_predicted_positives_is_none_not_zero() -> None:
    scores, labels = _dataset("random")
    at = pair_metrics(scores, labels, float(scores.max()) + 1)["at_threshold"]
    assert at["tp"] == 0 and at["fp"] == 0
    assert at["precision"] is None and at["f1"] is None
    assert at["recall"] == 0.0
    assert np.isnan(precision_score(labels, np.zeros_like(labels), zero_division=np.nan))


def test_empty_input_is_all_undefined() -> None:
    metrics = pair_metrics([], [], 0.5)
    assert metrics["counts"] == {"pairs": 0, "positives": 0, "negatives": 0}
    assert metrics["at_threshold"]["accuracy"] is None
    assert metrics["at_0_4"]["precision"] is None
    assert metrics["roc_auc"] is None and metrics["eer"] is None
    assert metrics["best_accuracy"]["accuracy"] is None
    assert metrics["mean_score"] == {"positive": None, "negative": None}
    assert calibrate_threshold([], []) is None


def test_no_threshold_leaves_at_threshold_undefined() -> None:
    scores, labels = _dataset("small")
    at = pair_metrics(scores, labels, None)["at_threshold"]
    assert set(at.values()) == {None}


@pytest.mark.parametrize("kind", KINDS)
def test_results_are_plain_json(kind: str) -> None:
    scores, labels = _dataset(kind)
    for metrics in (pair_metrics(scores, labels, 0.3), pair_metrics(scores, np.ones_like(labels), 0.3)):
        assert _plain_json_types(metrics)
        assert json.loads(json.dumps(metrics, allow_nan=False)) == metrics


@pytest.mark.parametrize(
    ("scores", "labels"),
    [([0.1, np.nan], [0, 1]), ([0.1, 0.2], [0, 2]), ([0.1, 0.2, 0.3], [0, 1]), ([np.inf, 0.1], [1, 0])],
)
def test_bad_input_is_rejected(scores: list[float], labels: list[int]) -> None:
    with pytest.raises(ValueError):
        pair_metrics(scores, labels, 0.4)


def test_the_roc_of_a_few_pairs_is_every_vertex() -> None:
    # Worked by hand: 3 same, 2 different. Lowering the threshold accepts 0.9 (a same), then the tie at 0.8
    # (a same and a different: one vertex moves both), 0.6 (a same), then 0.5 (a different).
    scores = [0.9, 0.8, 0.8, 0.6, 0.5]
    labels = [1, 1, 0, 1, 0]
    roc = pair_metrics(scores, labels, None)["roc"]
    assert roc == {
        "far": [0.0, 0.0, 0.5, 0.5, 1.0],
        "tar": [0.0, 0.3333, 0.6667, 1.0, 1.0],
    }
    assert pair_metrics(scores, [1] * 5, None)["roc"] is None, "no curve without both labels"


def test_a_long_roc_is_downsampled_to_true_vertices_from_corner_to_corner() -> None:
    scores, labels = _dataset("random")
    roc = pair_metrics(scores, labels, None)["roc"]
    far, tar = np.array(roc["far"]), np.array(roc["tar"])
    assert 50 <= far.size <= ROC_POINTS
    assert (far[0], tar[0], far[-1], tar[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert (np.diff(far) >= 0).all() and (np.diff(tar) >= 0).all()
    exact_far, exact_tar, _ = roc_curve(labels, scores, drop_intermediate=False)
    vertices = set(zip(np.round(exact_far, 4), np.round(exact_tar, 4), strict=True))
    assert set(zip(far, tar, strict=True)) <= vertices
    # The drawn curve encloses about the true area.
    assert np.trapezoid(tar, far) == pytest.approx(roc_auc_score(labels, scores), abs=0.01)
