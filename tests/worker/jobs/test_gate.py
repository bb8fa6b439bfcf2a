"""The promotion gate's rule on given figures: evidence, the bootstrap bound, a strict improvement, regression
and the best epoch. (tests/worker/jobs/test_gate_faces.py judges real checkpoints on real faces.)"""

from typing import Any

import pytest

from app.evidence import EvidenceCounts, EvidenceMinimums, evidence_report
from worker.jobs import gate

MINIMUMS = EvidenceMinimums(test_same=20, test_different=20, regression_pairs=20)
ENOUGH = evidence_report(EvidenceCounts(test_same=30, test_different=40, regression_pairs=25), MINIMUMS)


def _metrics(auc: float | None, eer: float | None, tar: float | None = 0.5, enough: bool = True) -> dict:
    far = {"far_target": 0.01, "tar": tar, "enough_negatives": enough}
    return {"roc_auc": auc, "eer": eer, "tar_at_far": [far], "counts": {"pairs": 70}}


def _interval(low: float | None, estimate: float = 0.0) -> dict[str, Any]:
    return {"roc_auc": {"estimate": estimate, "low": low, "high": None if low is None else low + 0.05}}


def _decide(
    test: tuple[dict, dict],
    regression: tuple[dict, dict] | None = None,
    *,
    low: float | None = 0.0,
    evidence: dict[str, Any] = ENOUGH,
    best_epoch: int = 2,
) -> gate.GateDecision:
    return gate.decide(
        test,
        regression,
        evidence=evidence,
        intervals={"test": _interval(low), "regression": None},
        test_auc_tolerance=0.002,
        regression_auc_tolerance=0.002,
        best_epoch=best_epoch,
    )


def _failing(decision: gate.GateDecision) -> list[str]:
    return [check.name for check in decision.checks if not check.passed]


@pytest.mark.parametrize(
    ("test", "regression", "low", "best_epoch", "failing"),
    [
        # a better AUC and EER, the interval's lower end above −0.002
        ((_metrics(0.95, 0.10), _metrics(0.97, 0.08)), None, 0.001, 2, []),
        # only the EER improves; the AUC may lose a little within the bound; forgetting within tolerance
        (
            (_metrics(0.95, 0.10), _metrics(0.949, 0.09)),
            (_metrics(0.990, 0.02), _metrics(0.9885, 0.03)),
            -0.0019,
            1,
            [],
        ),
        # only TAR@FAR=1e-2 improves, with enough negatives for it to count
        ((_metrics(0.95, 0.10, 0.5), _metrics(0.95, 0.10, 0.6)), None, -0.001, 1, []),
        # the same, on too few negatives: not an improvement
        (
            (_metrics(0.95, 0.10, 0.5, False), _metrics(0.95, 0.10, 0.6, False)),
            None,
            -0.001,
            1,
            ["test_improvement"],
        ),
        # a tie on a saturated set is not an improvement
        ((_metrics(1.0, 0.0, 1.0), _metrics(1.0, 0.0, 1.0)), None, 0.0, 2, ["test_improvement"]),
        # a better point estimate whose interval reaches below −0.002
        ((_metrics(0.95, 0.10), _metrics(0.96, 0.08)), None, -0.01, 2, ["test_auc_lower_bound"]),
        # worse everywhere
        (
            (_metrics(0.95, 0.10), _metrics(0.90, 0.12, 0.4)),
            None,
            -0.08,
            2,
            ["test_auc_lower_bound", "test_improvement"],
        ),
        (
            (_metrics(0.95, 0.10), _metrics(0.97, 0.08)),
            (_metrics(0.990, 0.02), _metrics(0.987, 0.02)),
            0.001,
            2,
            ["regression_auc"],
        ),
        (
            (_metrics(None, None, None), _metrics(None, None, None)),
            None,
            None,
            2,
            ["test_auc_lower_bound", "test_improvement"],
        ),
        (
            (_metrics(0.95, 0.10), _metrics(0.97, 0.08)),
            (_metrics(None, None), _metrics(0.99, None)),
            0.001,
            2,
            ["regression_auc"],
        ),
        ((_metrics(0.95, 0.10), _metrics(0.97, 0.08)), None, 0.001, 0, ["improved_on_val"]),
    ],
)
def test_the_gate(
    test: tuple[dict, dict],
    regression: tuple[dict, dict] | None,
    low: float | None,
    best_epoch: int,
    failing: list[str],
) -> None:
    decision = _decide(test, regression, low=low, best_epoch=best_epoch)
    assert _failing(decision) == failing
    assert decision.passed is (not failing)
    every_check = ["evidence", "test_auc_lower_bound", "test_improvement", "improved_on_val"]
    if regression is not None:
        every_check.insert(3, "regression_auc")
    assert [c.name for c in decision.checks] == every_check, "a missing check cannot pass the gate"
    assert decision.reasons[: len(decision.checks)] == [c.reason for c in decision.checks]
    assert all(decision.reasons)
    summary = decision.to_dict()
    assert summary["passed"] is decision.passed and summary["promoted"] is False
    assert summary["reasons"] == decision.reasons and summary["refusals"] == []
    assert [(c["name"], c["passed"]) for c in summary["checks"]] == [
        (c.name, c.passed) for c in decision.checks
    ]
    assert summary["intervals"]["test"]["roc_auc"]["low"] == low
    assert (summary["regression"] is None) == (regression is None)


def test_too_little_evidence_refuses_and_names_what_is_missing() -> None:
    """The issue's case: a tie at AUC 1.0 on 28 test pairs with 5 positives, and a small regression set."""
    evidence = evidence_report(EvidenceCounts(test_same=5, test_different=23, regression_pairs=12), MINIMUMS)
    decision = _decide(
        (_metrics(0.95, 0.10), _metrics(0.99, 0.02)),
        (_metrics(0.99, 0.02), _metrics(0.99, 0.02)),
        low=0.01,
        evidence=evidence,
    )
    assert _failing(decision) == ["evidence"] and not decision.passed
    assert decision.refusals == ["not-enough-evidence"]
    (check,) = [c for c in decision.checks if c.name == "evidence"]
    assert check.code == "not-enough-evidence"
    assert check.reason == "not-enough-evidence: test needs 15 more same; regression needs 8 more pairs"
    assert decision.to_dict()["evidence"]["needed"] == {"test": {"same": 15}, "regression": {"pairs": 8}}
