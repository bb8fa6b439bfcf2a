"""The promotion gate: when a fine-tuned model may replace its parent.

A candidate is promoted only when every check holds, each on pairs scored with both models:

1. Evidence: the test set holds at least `gate_min_test_same` same and `gate_min_test_different` different
   pairs and, when a regression set exists, it holds at least `gate_min_regression_pairs` (app/evidence.py).
   Below that the gate refuses with `not-enough-evidence` and names the labels still missing: a tie at AUC
   1.0 on 5 positives says nothing.
2. No loss beyond noise: in a paired bootstrap over the same test pairs, resampling faces
   (worker/ml/bootstrap.py), the lower end of the 95% interval of the AUC difference (candidate − parent) is
   at least −`gate_auc_tolerance` (0.002).
3. A real improvement: on test the candidate beats its parent strictly on at least one of AUC (higher), EER
   (lower) or TAR at FAR 1e-2 (higher; counted only when both sets have the 300 negatives that make FAR 1e-2
   more than a lucky pair). A tie, as on a saturated set, is not an improvement.
4. Regression AUC (only when a regression set exists): candidate ≥ parent − `regression_auc_tolerance`
   (0.002). Fine-tuning forgets; this bounds how much it may forget on faces it never saw.
5. Training improved on its start: the best epoch on val is not epoch 0. Otherwise the candidate holds the
   parent's own weights and promoting it would only cost a reindex.

A figure that cannot be computed (a set without both same and different pairs, an interval from too few
valid resamples) fails its check: the gate promotes only what it could verify. The result lists every check,
so a refusal says exactly which figure stood in the way; a failed check carries a `code` where a client may
act on it (`not-enough-evidence`: the review queue fills what `needed` names).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

NOT_ENOUGH_EVIDENCE = "not-enough-evidence"
TAR_FAR = 1e-2


@dataclass
class Check:
    name: str
    passed: bool
    reason: str
    candidate: float | None = None
    parent: float | None = None
    limit: float | None = None
    code: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "passed": self.passed,
            "code": self.code,
            "reason": self.reason,
            "candidate": self.candidate,
            "parent": self.parent,
            "limit": self.limit,
        }


@dataclass
class GateDecision:
    checks: list[Check]
    test: dict[str, Any]
    regression: dict[str, Any] | None
    intervals: dict[str, Any | None]
    evidence: dict[str, Any]
    promoted: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def reasons(self) -> list[str]:
        return [check.reason for check in self.checks] + self.notes

    @property
    def refusals(self) -> list[str]:
        """The codes of the failed checks that have one (e.g. `not-enough-evidence`)."""
        return [check.code for check in self.checks if not check.passed and check.code]

    def to_dict(self) -> dict[str, Any]:
        return {
            "promoted": self.promoted,
            "passed": self.passed,
            "refusals": self.refusals,
            "reasons": self.reasons,
            "checks": [check.to_dict() for check in self.checks],
            "test": self.test,
            "regression": self.regression,
            "intervals": self.intervals,
            "evidence": self.evidence,
        }


def _tar(metrics: dict[str, Any]) -> tuple[float | None, bool]:
    """TAR at FAR 1e-2 and whether the set had enough negatives for that FAR to mean anything."""
    for entry in metrics.get("tar_at_far") or []:
        if abs(float(entry.get("far_target", 0.0)) - TAR_FAR) < 1e-12:
            return entry.get("tar"), bool(entry.get("enough_negatives"))
    return None, False


def _figures(metrics: dict[str, Any]) -> dict[str, float | None]:
    eer = metrics.get("eer")
    if isinstance(eer, dict):
        eer = eer.get("eer")
    return {"roc_auc": metrics.get("roc_auc"), "eer": eer, "tar_at_far_1e_2": _tar(metrics)[0]}


def _summary(parent: dict[str, Any], candidate: dict[str, Any]) -> dict[str, Any]:
    p, c = _figures(parent), _figures(candidate)
    deltas = {key: None if c[key] is None or p[key] is None else c[key] - p[key] for key in p}
    return {"parent": p, "candidate": c, "deltas": deltas, "pairs": candidate.get("counts", {}).get("pairs")}


_UNDEFINED = "is undefined (the set needs both same and different pairs)"


def _evidence_check(evidence: dict[str, Any]) -> Check:
    needed: dict[str, dict[str, int]] = evidence.get("needed") or {}
    counts = evidence.get("counts", {})
    if not needed:
        return Check(
            "evidence",
            True,
            f"evidence: {counts.get('test_same')} same and {counts.get('test_different')} different test "
            f"pairs, {counts.get('regression_pairs')} regression pairs",
        )
    missing = "; ".join(
        f"{split} needs " + " and ".join(f"{n} more {kind}" for kind, n in kinds.items())
        for split, kinds in needed.items()
    )
    return Check("evidence", False, f"{NOT_ENOUGH_EVIDENCE}: {missing}", code=NOT_ENOUGH_EVIDENCE)


def _auc_bound_check(intervals: dict[str, Any] | None, tolerance: float) -> Check:
    auc = (intervals or {}).get("roc_auc") or {}
    low = auc.get("low")
    if low is None:
        return Check(
            "test_auc_lower_bound",
            False,
            "the bootstrap interval of the test AUC difference is undefined "
            "(the set needs both same and different pairs)",
            limit=-tolerance,
        )
    passed = low >= -tolerance
    relation = "≥" if passed else "<"
    return Check(
        "test_auc_lower_bound",
        passed,
        f"test AUC difference {auc.get('estimate'):+.4f}, 95% interval [{low:+.4f}, {auc.get('high'):+.4f}]:"
        f" lower bound {relation} −{tolerance:g}",
        candidate=low,
        limit=-tolerance,
    )


def _improvement_check(parent_metrics: dict[str, Any], candidate_metrics: dict[str, Any]) -> Check:
    parent, candidate = _figures(parent_metrics), _figures(candidate_metrics)
    if candidate["roc_auc"] is None or parent["roc_auc"] is None:
        return Check("test_improvement", False, f"test AUC {_UNDEFINED}")
    better: list[str] = []
    if candidate["roc_auc"] > parent["roc_auc"]:
        better.append(f"AUC {parent['roc_auc']:.4f} → {candidate['roc_auc']:.4f}")
    if candidate["eer"] is not None and parent["eer"] is not None and candidate["eer"] < parent["eer"]:
        better.append(f"EER {parent['eer']:.4f} → {candidate['eer']:.4f}")
    (tar_c, enough_c), (tar_p, enough_p) = _tar(candidate_metrics), _tar(parent_metrics)
    if enough_c and enough_p and tar_c is not None and tar_p is not None and tar_c > tar_p:
        better.append(f"TAR@FAR=1e-2 {tar_p:.4f} → {tar_c:.4f}")
    if better:
        return Check("test_improvement", True, "improves on test: " + ", ".join(better))
    return Check(
        "test_improvement",
        False,
        f"no improvement on test: AUC {candidate['roc_auc']:.4f} vs parent {parent['roc_auc']:.4f}, "
        f"EER {_fmt(candidate['eer'])} vs {_fmt(parent['eer'])}, TAR@FAR=1e-2 not better "
        "(or too few negatives to tell)",
    )


def _fmt(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.4f}"


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
    evidence: dict[str, Any],
    intervals: dict[str, dict[str, Any] | None],
    test_auc_tolerance: float,
    regression_auc_tolerance: float,
    best_epoch: int,
) -> GateDecision:
    """Apply the gate to (parent metrics, candidate metrics) on test and, when present, on regression.

    `evidence` is app.evidence.evidence_report of the pairs judged on; `intervals` holds the bootstrap reports
    (worker.ml.bootstrap.paired_bootstrap) by set name, `test` among them.
    """
    parent, candidate = test
    checks = [
        _evidence_check(evidence),
        _auc_bound_check(intervals.get("test"), test_auc_tolerance),
        _improvement_check(parent, candidate),
    ]
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
    return GateDecision(
        checks=checks,
        test=_summary(*test),
        regression=regression_summary,
        intervals=dict(intervals),
        evidence=evidence,
        notes=notes,
    )
