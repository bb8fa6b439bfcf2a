"""The split of a face by its content hash alone, as the api and the worker both decide it."""

import random
import subprocess
import sys
from collections import Counter

import pytest

from app.splits import DEFAULT_SPLIT_FRACTIONS, SPLIT_NAMES, split_for_digest, validate_split_fractions
from tests.conftest import REPO_ROOT


def _random_digests(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.getrandbits(256):064x}" for _ in range(count)]


def test_fractions_are_honoured_on_many_digests() -> None:
    digests = _random_digests(10_000)
    for fractions in (DEFAULT_SPLIT_FRACTIONS, {"train": 0.5, "val": 0.2, "test": 0.3}):
        counts = Counter(split_for_digest(d, fractions) for d in digests)
        for name in SPLIT_NAMES:
            assert counts[name] / len(digests) == pytest.approx(fractions[name], abs=0.02)


def test_digest_maps_to_cumulative_fractions_in_train_val_test_order() -> None:
    boundary = int(0.7 * 2**64)
    assert split_for_digest(f"{boundary - 4096:016x}" + "0" * 48) == "train"
    assert split_for_digest(f"{boundary:016x}" + "0" * 48) == "val"
    assert split_for_digest("0" * 64) == "train"
    assert split_for_digest("f" * 64) == "test"
    assert split_for_digest("F" * 64, {"train": 1.0}) == "train"


def test_fractions_within_tolerance_are_accepted() -> None:
    assert validate_split_fractions({"train": 0.7, "val": 0.15, "test": 0.15 + 5e-7})["test"] > 0.15


@pytest.mark.parametrize("digest", ["", "abc", "z" * 64, "0" * 63, "0" * 65])
def test_malformed_digest_is_rejected(digest: str) -> None:
    with pytest.raises(ValueError):
        split_for_digest(digest)


def test_app_splits_imports_only_the_standard_library() -> None:
    code = "import sys, app.splits; bad = {'torch', 'worker'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)
