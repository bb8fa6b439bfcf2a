import hashlib
import random
from collections import Counter
from pathlib import Path

import pytest

from app.splits import SPLIT_NAMES, split_for_digest, validate_split_fractions
from worker.ml import splits as splits_module
from worker.ml.pairs import LabeledPair, read_pairs
from worker.ml.splits import file_digest, split_pairs


@pytest.fixture(scope="module")
def johns_pairs(johns_dir: Path) -> list[LabeledPair]:
    return read_pairs(johns_dir / "pairs.json").pairs


def _random_digests(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.getrandbits(256):064x}" for _ in range(count)]


def test_no_image_is_in_two_splits_and_kept_pairs_stay_inside_theirs(johns_pairs: list[LabeledPair]) -> None:
    result = split_pairs(johns_pairs)
    images = {image for pair in johns_pairs for image in (pair.image1, pair.image2)}
    assert set(result.image_split) == images
    for name, pairs in result.splits.items():
        for pair in pairs:
            assert result.image_split[pair.image1] == name == result.image_split[pair.image2]
    expected_dropped = sum(result.image_split[p.image1] != result.image_split[p.image2] for p in johns_pairs)
    assert result.dropped_cross == expected_dropped > 0
    assert sum(result.pair_counts.values()) + result.dropped_cross == len(johns_pairs)
    per_split = Counter(result.image_split.values())
    assert result.image_counts == {name: per_split[name] for name in SPLIT_NAMES}
    assert sum(result.image_counts.values()) == len(images) == 55


def test_split_of_an_image_follows_its_content_hash(johns_pairs: list[LabeledPair]) -> None:
    result = split_pairs(johns_pairs)
    for image, name in result.image_split.items():
        assert name == split_for_digest(hashlib.sha256(image.read_bytes()).hexdigest())


def test_split_is_deterministic_and_independent_of_pair_order(johns_pairs: list[LabeledPair]) -> None:
    first = split_pairs(johns_pairs)
    shuffled = list(johns_pairs)
    random.Random(7).shuffle(shuffled)
    second = split_pairs(shuffled)
    assert first.image_split == second.image_split
    assert first.dropped_cross == second.dropped_cross
    for name in SPLIT_NAMES:
        assert set(first.splits[name]) == set(second.splits[name])
    assert split_pairs(johns_pairs).splits == first.splits


def test_a_split_without_val_never_assigns_val(johns_pairs: list[LabeledPair]) -> None:
    fractions = {"train": 0.8, "test": 0.2}
    assert {split_for_digest(d, fractions) for d in _random_digests(2_000)} == {"train", "test"}
    result = split_pairs(johns_pairs, {"train": 0.8, "val": 0.0, "test": 0.2})
    assert result.splits["val"] == [] and result.image_counts["val"] == 0
    assert result.pair_counts["train"] > 0 and result.pair_counts["test"] > 0


@pytest.mark.parametrize(
    "fractions",
    [
        {"train": 0.7, "val": 0.2, "test": 0.2},
        {"train": 1.1, "test": -0.1},
        {"train": 0.5, "holdout": 0.5},
        {"train": float("nan"), "test": 1.0},
        {"train": True},
        {"train": "1"},
        {},
    ],
)
def test_invalid_fractions_are_rejected(fractions: dict, johns_pairs: list[LabeledPair]) -> None:
    with pytest.raises(ValueError):
        validate_split_fractions(fractions)
    with pytest.raises(ValueError):
        split_for_digest("0" * 64, fractions)
    with pytest.raises(ValueError):
        split_pairs(johns_pairs[:3], fractions)


def test_known_digests_are_not_rehashed(
    johns_pairs: list[LabeledPair], monkeypatch: pytest.MonkeyPatch
) -> None:
    images = {image for pair in johns_pairs for image in (pair.image1, pair.image2)}

    def refuse(path: object) -> str:
        raise AssertionError(f"hashed {path}")

    monkeypatch.setattr(splits_module, "file_digest", refuse)
    result = split_pairs(johns_pairs, digests=dict.fromkeys(images, "0" * 64))
    assert result.image_counts["train"] == len(images)
    assert result.pair_counts["train"] == len(johns_pairs) and result.dropped_cross == 0


def test_file_digest_is_the_content_sha256(tmp_path: Path) -> None:
    path = tmp_path / "face.bin"
    path.write_bytes(b"not really a face" * 1000)
    assert file_digest(path) == hashlib.sha256(path.read_bytes()).hexdigest()
