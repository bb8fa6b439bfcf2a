"""The paired face bootstrap: unit weights reproduce pair_metrics, intervals cover what they should."""

import time

import numpy as np
import pytest

from worker.ml.bootstrap import BootstrapConfig, face_counts, paired_bootstrap
from worker.ml.metrics import pair_metrics


def _pairs(seed: int, faces: int = 300, pairs: int = 2000) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, faces, pairs)
    b = (a + rng.integers(1, faces, pairs)) % faces
    labels = (rng.random(pairs) < 0.3).astype(int)
    parent = np.round(rng.normal(labels * 1.0, 1.0), 2)  # rounded: ties in scores
    return a, b, labels, parent, rng


def test_the_estimates_are_the_differences_of_pair_metrics() -> None:
    a, b, labels, parent, rng = _pairs(1)
    candidate = np.round(parent + rng.normal(0.3 * labels, 0.3), 2)
    report = paired_bootstrap(parent, candidate, labels, a, b, BootstrapConfig(samples=200))
    p, c = pair_metrics(parent, labels, None), pair_metrics(candidate, labels, None)
    assert report["roc_auc"]["estimate"] == pytest.approx(c["roc_auc"] - p["roc_auc"], abs=1e-12)
    assert report["eer"]["estimate"] == pytest.approx(c["eer"] - p["eer"], abs=1e-12)
    tar = c["tar_at_far"][1]["tar"] - p["tar_at_far"][1]["tar"]
    assert report["tar_at_far_1e_2"]["estimate"] == pytest.approx(tar, abs=1e-12)
    for figure in ("roc_auc", "eer", "tar_at_far_1e_2"):
        entry = report[figure]
        assert entry["low"] <= entry["estimate"] <= entry["high"], figure
    assert report["roc_auc"]["low"] > 0, "a clear gain: the whole interval is above 0"
    assert report["eer"]["high"] < 0
    assert report["valid"] == 200 and report["faces"] == 300 and report["pairs"] == 2000


def test_the_same_scores_give_a_zero_interval_and_a_seed_repeats() -> None:
    a, b, labels, parent, _ = _pairs(2)
    report = paired_bootstrap(parent, parent, labels, a, b, BootstrapConfig(samples=100, seed=3))
    assert report["roc_auc"] == {"estimate": 0.0, "low": 0.0, "high": 0.0}
    noisy = parent + np.random.default_rng(4).normal(0, 0.5, parent.size)
    once = paired_bootstrap(parent, noisy, labels, a, b, BootstrapConfig(samples=100, seed=3))
    again = paired_bootstrap(parent, noisy, labels, a, b, BootstrapConfig(samples=100, seed=3))
    other = paired_bootstrap(parent, noisy, labels, a, b, BootstrapConfig(samples=100, seed=4))
    assert once == again and once["roc_auc"] != other["roc_auc"]


def test_resampling_faces_widens_the_interval_when_pairs_share_faces() -> None:
    """Few faces in many pairs: a face-level error moves many pairs at once, which a pair bootstrap misses."""
    rng = np.random.default_rng(5)
    faces, pairs = 40, 780
    a, b = np.triu_indices(faces, 1)
    a, b = a[:pairs], b[:pairs]
    identity = rng.integers(0, 8, faces)
    labels = (identity[a] == identity[b]).astype(int)
    parent = rng.normal(labels, 1.0)
    face_effect = rng.normal(0, 0.8, faces)  # the candidate moves every same pair of a face together
    candidate = parent + (face_effect[a] + face_effect[b]) * labels
    by_face = paired_bootstrap(parent, candidate, labels, a, b, BootstrapConfig(samples=400))
    by_pair = paired_bootstrap(
        parent, candidate, labels, np.arange(pairs), np.arange(pairs) + pairs, BootstrapConfig(samples=400)
    )
    width = {
        name: report["roc_auc"]["high"] - report["roc_auc"]["low"]
        for name, report in (("face", by_face), ("pair", by_pair))
    }
    assert width["face"] > 1.2 * width["pair"], width


def test_each_replicate_draws_as_many_faces_as_there_are() -> None:
    counts = face_counts(np.array([0, 1, 2]), np.array([3, 4, 5]), samples=50, seed=0)
    assert counts.shape == (50, 6) and (counts.sum(axis=1) == 6).all()


def test_undefined_without_both_labels() -> None:
    report = paired_bootstrap([0.1, 0.2], [0.3, 0.4], [1, 1], [0, 1], [2, 3], BootstrapConfig(samples=100))
    assert report["roc_auc"] == {"estimate": None, "low": None, "high": None}
    with pytest.raises(ValueError, match="same pairs"):
        paired_bootstrap([0.1], [0.3, 0.4], [1, 0], [0, 1], [2, 3])


def test_a_thousand_resamples_of_thousands_of_pairs_take_well_under_a_second() -> None:
    a, b, labels, parent, rng = _pairs(6, faces=1000, pairs=3000)
    candidate = parent + rng.normal(0, 0.2, parent.size)
    started = time.process_time()
    paired_bootstrap(parent, candidate, labels, a, b, BootstrapConfig(samples=1000))
    assert time.process_time() - started < 1.0
