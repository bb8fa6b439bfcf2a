"""The promotion gate: a fine-tuned child against its parent on test and regression metrics."""

from typing import Any

import pytest

from worker.jobs import gate


def _metrics(auc: float | None, eer: float | None) -> dict[str, Any]:
    return {"roc_auc": auc, "eer": eer, "counts": {"pairs": 10}}


@pytest.mark.parametrize(
    ("test", "regression", "best_epoch", "passed", "failing"),
    [
        ((_metrics(0.95, 0.10), _metrics(0.97, 0.08)), None, 2, True, []),
        (
            (_metrics(0.95, 0.10), _metrics(0.95, 0.10)),
            (_metrics(0.990, 0.02), _metrics(0.9885, 0.03)),
            1,
            True,
            [],
        ),
        ((_metrics(0.95, 0.10), _metrics(0.94, 0.08)), None, 2, False, ["test_auc"]),
        ((_metrics(0.95, 0.10), _metrics(0.96, 0.12)), None, 2, False, ["test_eer"]),
        (
            (_metrics(0.95, 0.10), _metrics(0.97, 0.08)),
            (_metrics(0.990, 0.02), _metrics(0.987, 0.02)),
            2,
            False,
            ["regression_auc"],
        ),
        ((_metrics(None, None), _metrics(None, None)), None, 2, False, ["test_auc", "test_eer"]),
        (
            (_metrics(0.95, 0.10), _metrics(0.97, 0.08)),
            (_metrics(None, None), _metrics(0.99, None)),
            2,
            False,
            ["regression_auc"],
        ),
        ((_metrics(0.95, 0.10), _metrics(0.95, 0.10)), None, 0, False, ["improved_on_val"]),
    ],
)
def test_the_gate(
    test: tuple[dict, dict],
    regression: tuple[dict, dict] | None,
    best_epoch: int,
    passed: bool,
    failing: list[str],
) -> None:
    decision = gate.decide(test, regression, regression_auc_tolerance=0.002, best_epoch=best_epoch)
    assert decision.passed is passed
    assert [c.name for c in decision.checks if not c.passed] == failing
    every_check = ["test_auc", "test_eer", "improved_on_val"]
    if regression is not None:
        every_check.insert(2, "regression_auc")
    assert [c.name for c in decision.checks] == every_check, "a missing check cannot pass the gate"
    assert len(decision.reasons) >= len(decision.checks)
    assert decision.reasons[: len(decision.checks)] == [c.reason for c in decision.checks]
    assert all(decision.reasons)
    summary = decision.to_dict()
    assert summary["passed"] is passed and summary["promoted"] is False
    assert summary["reasons"] == decision.reasons
    assert [(c["name"], c["passed"]) for c in summary["checks"]] == [
        (c.name, c.passed) for c in decision.checks
    ]
    assert (summary["regression"] is None) == (regression is None)
