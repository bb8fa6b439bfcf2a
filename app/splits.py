"""Which split (train, val or test) a face belongs to, decided by its content hash alone.

Pure standard library: the api (which may not import torch or worker code) and the worker both use it, so a
face lands in the same split whichever process asks. A split is per face, never per pair: a pair belongs to a
split only when both of its faces do, so no face is ever trained on and tested on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType

from app.domain import FaceSplit

# Plain strings, in the order the hash is cut: they name files and appear in messages as they are.
SPLIT_NAMES: tuple[str, ...] = tuple(split.value for split in FaceSplit)
DEFAULT_SPLIT_FRACTIONS: Mapping[str, float] = MappingProxyType(
    {FaceSplit.TRAIN.value: 0.7, FaceSplit.VAL.value: 0.15, FaceSplit.TEST.value: 0.15}
)
FRACTION_SUM_TOLERANCE = 1e-6
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def validate_split_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    """All three fractions (missing ones are 0), or ValueError saying what is wrong."""
    unknown = sorted(set(fractions) - set(SPLIT_NAMES))
    if unknown:
        raise ValueError(f"unknown split names {unknown}; splits are {list(SPLIT_NAMES)}")
    result: dict[str, float] = {}
    for name in SPLIT_NAMES:
        value = fractions.get(name, 0.0)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"split fraction {name!r} must be a finite number, got {value!r}")
        if value < 0:
            raise ValueError(f"split fraction {name!r} must not be negative, got {value}")
        result[name] = float(value)
    total = math.fsum(result.values())
    if abs(total - 1.0) > FRACTION_SUM_TOLERANCE:
        raise ValueError(f"split fractions must sum to 1, got {total:g} ({result})")
    return result


def split_for_digest(sha256_hex: str, fractions: Mapping[str, float] = DEFAULT_SPLIT_FRACTIONS) -> str:
    """The split of a face whose content sha256 is ``sha256_hex``.

    u = int(first 16 hex digits) / 2**64 is uniform in [0, 1); the face goes to the first split, in the order
    train, val, test, whose cumulative fraction exceeds u. A split with fraction 0 never receives a face.
    """
    if len(sha256_hex) != 64 or not _HEX_DIGITS.issuperset(sha256_hex):
        raise ValueError(f"expected a sha256 as 64 hex digits, got {sha256_hex!r}")
    shares = validate_split_fractions(fractions)
    u = int(sha256_hex[:16], 16) / 2**64
    cumulative = 0.0
    for name in SPLIT_NAMES:
        cumulative += shares[name]
        if u < cumulative:
            return name
    # Only reachable when rounding leaves the sum just under 1: the last split that takes faces.
    return next(name for name in reversed(SPLIT_NAMES) if shares[name] > 0)
