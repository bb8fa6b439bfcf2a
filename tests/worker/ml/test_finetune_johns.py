"""Fine-tuning the real MobileFaceNet on the real johns faces (5 people × 11 images).

Splits are per image from content hashes (deterministic). Fractions 0.6/0.2/0.2 give 34/9/12 images, i.e.
561 train, 36 val (7 same) and 66 test (12 same) pairs: the smallest val and test sets that still hold both
classes with more than a handful of positives. On that test split the pretrained model is not perfect
(AUC ≈ 0.997, EER ≈ 0.019), so "beats" can be strict. Run with `-s` to see both models' figures.
"""

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from worker.ml.checkpoints import load_backbone
from worker.ml.evaluation import ModelUnderTest, compare_models, score_pairs
from worker.ml.metrics import calibrate_threshold
from worker.ml.pairs import IndexedPairs, LabeledPair, index_pairs, read_pairs
from worker.ml.preprocessing import ImageCache, preprocess_spec_for
from worker.ml.splits import split_pairs
from worker.ml.training import TrainConfig, finetune

pytestmark = pytest.mark.slow

FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}
SPEC = preprocess_spec_for("mobilefacenet")
FORGETTING_TOLERANCE = 0.002  # the promotion gate's limit on AUC lost on faces never trained on
# Of the ten ways to pick three people, the one where the contrastive loss alone forgot most: pairs among
# the other two (Savage, Simm) lost 0.0086 AUC. Distillation towards the parent (the default) keeps them.
TRAINED_PEOPLE = frozenset({"John_Salley", "John_Schneider", "John_Shimkus"})


@pytest.fixture(scope="module")
def johns_pairs(johns_dir: Path) -> list[LabeledPair]:
    require((johns_dir / "pairs.json").is_file(), f"johns pairs not found under {johns_dir}")
    return read_pairs(johns_dir / "pairs.json").pairs


@pytest.fixture(scope="module")
def cache() -> ImageCache:
    return ImageCache()


@pytest.fixture(scope="module")
def checkpoint(mobilefacenet_checkpoint: Path) -> Path:
    require(
        mobilefacenet_checkpoint.is_file(),
        f"MobileFaceNet checkpoint not found at {mobilefacenet_checkpoint}",
    )
    return mobilefacenet_checkpoint


def person(path: Path) -> str:
    return Path(path).parent.name


def fine_tuned_against_pretrained(
    checkpoint: Path, pairs: list[LabeledPair], cache: ImageCache, held_out: IndexedPairs | None = None
) -> tuple[dict[str, Any], dict[str, IndexedPairs], Any]:
    """Splits `pairs` per image, fine-tunes on train (val picks the epoch and the threshold), then compares
    both models on the test split, or on `held_out` when given."""
    split = split_pairs(pairs, FRACTIONS)
    sets = {name: index_pairs(split.splits[name], cache) for name in ("train", "val", "test")}
    assert not set(sets["train"].names) & (set(sets["val"].names) | set(sets["test"].names))
    pretrained = load_backbone(checkpoint).model
    val_scores = score_pairs(pretrained, SPEC, sets["val"])
    pretrained_threshold = calibrate_threshold(val_scores, sets["val"].labels.numpy())
    tuned = load_backbone(checkpoint).model
    result = finetune(tuned, SPEC, sets["train"], sets["val"], TrainConfig(), device="cpu")
    comparison = compare_models(
        ModelUnderTest(pretrained, SPEC, pretrained_threshold, "val"),
        ModelUnderTest(tuned, SPEC, result.threshold, "val"),
        held_out if held_out is not None else sets["test"],
    )
    return comparison, sets, result


def figures(metrics: dict[str, Any]) -> dict[str, Any]:
    at = metrics["at_threshold"]
    return {
        "auc": metrics["roc_auc"],
        "eer": metrics["eer"],
        "threshold": at["threshold"],
        "accuracy": at["accuracy"],
        "accuracy_at_0_4": metrics["at_0_4"]["accuracy"],
        "tar_at_far": {entry["far_target"]: entry["tar"] for entry in metrics["tar_at_far"]},
        "mean_cosine": metrics["mean_score"],
    }


def report(title: str, comparison: dict[str, Any], **extra: Any) -> None:
    body = {
        "pretrained": figures(comparison["baseline"]),
        "fine_tuned": figures(comparison["candidate"]),
        "deltas": comparison["deltas"],
        **extra,
    }
    print(f"\n{title}\n{json.dumps(body, indent=2, default=str)}")


def test_fine_tuned_model_beats_the_pretrained_one_on_held_out_pairs(
    checkpoint: Path, johns_pairs: list[LabeledPair], cache: ImageCache
) -> None:
    comparison, sets, result = fine_tuned_against_pretrained(checkpoint, johns_pairs, cache)
    base, tuned = comparison["baseline"], comparison["candidate"]
    report(
        "johns, 0.6/0.2/0.2 split, held-out test pairs",
        comparison,
        pairs={name: len(pairs) for name, pairs in sets.items()},
        best_epoch=result.best_epoch,
        history=[record.to_dict() for record in result.history],
    )
    assert base["counts"]["positives"] >= 10 and base["counts"]["negatives"] >= 10
    assert base["roc_auc"] < 1.0, "the pretrained model is already perfect on this split: nothing to beat"
    assert tuned["roc_auc"] >= base["roc_auc"] and tuned["eer"] <= base["eer"]
    assert tuned["roc_auc"] > base["roc_auc"] or tuned["eer"] < base["eer"]
    assert tuned["at_threshold"]["accuracy"] >= base["at_threshold"]["accuracy"]
    # The score scale survives (margin 1.0 once collapsed accuracy at the fixed 0.4 to 0.17).
    assert tuned["at_0_4"]["accuracy"] >= base["at_0_4"]["accuracy"] - 0.02


def test_fine_tuning_on_three_people_does_not_forget_the_other_two(
    checkpoint: Path, johns_pairs: list[LabeledPair], cache: ImageCache
) -> None:
    people = {person(pair.image1) for pair in johns_pairs}
    require(people >= TRAINED_PEOPLE, f"the johns set lacks some of {sorted(TRAINED_PEOPLE)}")
    trained, others = set(TRAINED_PEOPLE), people - TRAINED_PEOPLE
    inside = [p for p in johns_pairs if {person(p.image1), person(p.image2)} <= trained]
    outside = [p for p in johns_pairs if {person(p.image1), person(p.image2)} <= others]
    held_out = index_pairs(outside, cache)
    comparison, sets, result = fine_tuned_against_pretrained(checkpoint, inside, cache, held_out)
    assert not set(held_out.names) & set(sets["train"].names)
    report(
        f"johns, fine-tuned on {sorted(trained)}, scored on pairs among {sorted(others)}",
        comparison,
        pairs={"held_out": len(held_out), **{name: len(pairs) for name, pairs in sets.items()}},
        best_epoch=result.best_epoch,
    )
    assert comparison["candidate"]["roc_auc"] >= comparison["baseline"]["roc_auc"] - FORGETTING_TOLERANCE
