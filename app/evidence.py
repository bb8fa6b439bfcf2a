"""How much labelled evidence the promotion gate needs, and how much is still missing.

The gate refuses to judge on a handful of pairs: a tie at AUC 1.0 on 5 positives says nothing. It needs at
least `gate_min_test_same` same and `gate_min_test_different` different pairs in the `test` split, and, when a
regression set exists at all, `gate_min_regression_pairs` regression pairs. The worker's gate and the api's
review queue (which fills what is missing) read the same counts through this module, so they never disagree.
Standard library and SQLAlchemy only: the api may not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.domain import FeedbackSplit
from app.tables import FeedbackPair


@dataclass(frozen=True)
class EvidenceCounts:
    """Stored feedback pairs per evaluation set and label (1 same, 0 different)."""

    test_same: int = 0
    test_different: int = 0
    val_same: int = 0
    val_different: int = 0
    regression_pairs: int = 0


@dataclass(frozen=True)
class EvidenceMinimums:
    test_same: int
    test_different: int
    regression_pairs: int

    @classmethod
    def from_settings(cls, settings: Settings) -> EvidenceMinimums:
        return cls(
            test_same=settings.gate_min_test_same,
            test_different=settings.gate_min_test_different,
            regression_pairs=settings.gate_min_regression_pairs,
        )

    def to_dict(self) -> dict[str, int]:
        return {
            "test_same": self.test_same,
            "test_different": self.test_different,
            "regression_pairs": self.regression_pairs,
        }


def evidence_needed(counts: EvidenceCounts, minimums: EvidenceMinimums) -> dict[str, dict[str, int]]:
    """Labels still missing, by split and kind: `{"test": {"same": n, "different": m}, "regression": {...}}`.

    Only splits with something missing appear, so an empty dict means the gate has enough to judge. The
    regression minimum applies only once a regression set exists (a deployment may have none).
    """
    needed: dict[str, dict[str, int]] = {}
    test = {
        "same": max(0, minimums.test_same - counts.test_same),
        "different": max(0, minimums.test_different - counts.test_different),
    }
    if any(test.values()):
        needed[FeedbackSplit.TEST.value] = {kind: n for kind, n in test.items() if n}
    if counts.regression_pairs and counts.regression_pairs < minimums.regression_pairs:
        needed[FeedbackSplit.REGRESSION.value] = {
            "pairs": minimums.regression_pairs - counts.regression_pairs
        }
    return needed


def val_needed(counts: EvidenceCounts, settings: Settings) -> dict[str, dict[str, int]]:
    """Val labels still missing for a fine-tune to run well: `{"val": {"same": n, "different": m}}` or `{}`.

    A fine-tune refuses to start without both labels in `val` (they pick its epoch and calibrate its
    threshold), and a threshold calibrated on two or three positives is noise; the review queue fills these
    as it fills the gate's test needs.
    """
    missing = {
        "same": max(0, settings.review_min_val_same - counts.val_same),
        "different": max(0, settings.review_min_val_different - counts.val_different),
    }
    missing = {kind: n for kind, n in missing.items() if n}
    return {FeedbackSplit.VAL.value: missing} if missing else {}


def count_evidence(session: Session) -> EvidenceCounts:
    """The stored feedback pairs of the evaluation sets (one grouped query on `ix_feedback_split_label`)."""
    wanted = (FeedbackSplit.TEST, FeedbackSplit.VAL, FeedbackSplit.REGRESSION)
    rows = session.execute(
        select(FeedbackPair.split, FeedbackPair.label, func.count())
        .where(FeedbackPair.split.in_(wanted))
        .group_by(FeedbackPair.split, FeedbackPair.label)
    ).all()
    by_key: dict[tuple[str, int], int] = {(str(split), int(label)): int(n) for split, label, n in rows}
    return EvidenceCounts(
        test_same=by_key.get((FeedbackSplit.TEST.value, 1), 0),
        test_different=by_key.get((FeedbackSplit.TEST.value, 0), 0),
        val_same=by_key.get((FeedbackSplit.VAL.value, 1), 0),
        val_different=by_key.get((FeedbackSplit.VAL.value, 0), 0),
        regression_pairs=sum(
            n for (split, _), n in by_key.items() if split == FeedbackSplit.REGRESSION.value
        ),
    )


def evidence_report(counts: EvidenceCounts, minimums: EvidenceMinimums) -> dict[str, Any]:
    """What a job result and `/v1/metrics` show: the counts, the minimums and what is still needed."""
    return {
        "counts": {
            "test_same": counts.test_same,
            "test_different": counts.test_different,
            "regression_pairs": counts.regression_pairs,
        },
        "minimums": minimums.to_dict(),
        "needed": evidence_needed(counts, minimums),
    }
