"""The promotion gate: when a fine-tuned model may replace its parent.

A candidate passes only when every check holds, each on pairs scored with both models:

1. Test AUC: candidate ≥ parent, on the same `test` pairs.
2. Test EER: candidate ≤ parent, on the same pairs. "Not worse" on test means both: a model that ranks pairs
   better overall but separates them worse at its operating point is not promoted.
3. Regression AUC (only when a regression set exists): candidate ≥ parent − `regression_auc_tolerance`
   (settings, 0.002). Fine-tuning forgets; this bounds how much it may forget on faces it never saw.
4. Training improved on its start: the best epoch on val is not epoch 0. Otherwise the candidate holds the
   parent's own weights and promoting it would only cost a reindex.

A figure that cannot be computed (a set without both same and different pairs, so AUC and EER are undefined)
fails its check: the gate promotes only what it could verify. The result lists every check, so a refusal says
exactly which figure stood in the way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Check:
    name: str
    passed: bool
    reason: str
    candidate: float | None = None
    parent: float | None = None
    limit: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "passed": self.passed,
            "candidate": self.candidate,
            "parent": self.parent,
            "limit": self.limit,
        }


@dataclass
class GateDecision:
    checks: list[Check]
    test: dict[str, Any]
    regression: dict[str, Any] | None
    promoted: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def reasons(self) -> list[str]:
        return [check.reason for check in self.checks] + self.notes

    def to_dict(self) -> dict[str, Any]:
        return {
            "promoted": self.promoted,
            "passed": self.passed,
            "reasons": self.reasons,
            "checks": [check.to_dict() for check in self.checks],
            "test": self.test,
            "regression": self.regression,
        }


def _figures(metrics: dict[str, Any]) -> dict[str, float | None]:
    eer = metrics.get("eer")
    if isinstance(eer, dict):
        eer = eer.get("eer")
    return {"roc_auc": metrics.get("roc_auc"), "eer": eer}


def _summary(parent: dict[str, Any], candidate: dict[str, Any]) -> dict[str, Any]:
    p, c = _figures(parent), _figures(candidate)
    deltas = {key: None if c[key] is None or p[key] is None else c[key] - p[key] for key in p}
    return {"parent": p, "candidate": c, "deltas": deltas, "pairs": candidate.get("counts", {}).get("pairs")}


_UNDEFINED = "is undefined (the set needs both same and different pairs)"


def _at_least(
    name: str, what: str, candidate: float | None, parent: float | None, *, tolerance: float = 0.0
) -> Check:
    if candidate is None or parent is None:
        return Check(name, False, f"{what} {_UNDEFINED}", candidate, parent)
    limit = parent - tolerance
    passed = candidate >= limit
    relation = "≥" if passed else "<"
    bound = f"parent {parent:.4f}" + (f" − {tolerance:g}" if tolerance else "")
    return Check(name, passed, f"{what} {candidate:.4f} {relation} {bound}", candidate, parent, limit)


def decide(
    test: tuple[dict[str, Any], dict[str, Any]],
    regression: tuple[dict[str, Any], dict[str, Any]] | None,
    *,
    regression_auc_tolerance: float,
    best_epoch: int,
) -> GateDecision:
    """Apply the gate to (parent metrics, candidate metrics) on test and, when present, on regression."""
    parent, candidate = (_figures(m) for m in test)
    checks = [_at_least("test_auc", "test AUC", candidate["roc_auc"], parent["roc_auc"])]
    if candidate["eer"] is None or parent["eer"] is None:
        checks.append(Check("test_eer", False, f"test EER {_UNDEFINED}", candidate["eer"], parent["eer"]))
    else:
        passed = candidate["eer"] <= parent["eer"]
        relation = "≤" if passed else ">"
        checks.append(
            Check(
                "test_eer",
                passed,
                f"test EER {candidate['eer']:.4f} {relation} parent {parent['eer']:.4f}",
                candidate["eer"],
                parent["eer"],
                parent["eer"],
            )
        )
    regression_summary = None
    if regression is not None:
        reg_parent, reg_candidate = (_figures(m) for m in regression)
        checks.append(
            _at_least(
                "regression_auc",
                "regression AUC",
                reg_candidate["roc_auc"],
                reg_parent["roc_auc"],
                tolerance=regression_auc_tolerance,
            )
        )
        regression_summary = _summary(*regression)
    improved = best_epoch > 0
    checks.append(
        Check(
            "improved_on_val",
            improved,
            f"best epoch on val is {best_epoch}"
            + ("" if improved else " (no epoch beat the starting weights)"),
        )
    )
    notes = [] if regression is not None else ["no regression set: forgetting was not measured"]
    return GateDecision(checks=checks, test=_summary(*test), regression=regression_summary, notes=notes)
