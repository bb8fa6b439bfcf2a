"""Our side and the reference side, alternated in rounds so background load hits both alike."""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Mapping
from typing import Any

Side = Callable[[], dict[str, float]]


def alternate(
    label: str, sides: Mapping[str, Side], *, unit: str, rounds: int, target: float
) -> dict[str, Any]:
    """Runs `ours` and `plain` in turn `rounds` times; each run returns its `unit` count, seconds and CPU
    seconds (any other counts are summed too). The result carries the ratio of the totals (the one the
    target applies to), the median of the per-round ratios and the ratio of CPU time."""
    totals: dict[str, dict[str, float]] = {name: {} for name in sides}
    round_ratios = []
    for _ in range(rounds):
        rates = {}
        for name, run in sides.items():
            result = run()
            for key, value in result.items():
                totals[name][key] = totals[name].get(key, 0) + value
            rates[name] = result[unit] / result["seconds"]
            print(f"{label} {name}: {result}", file=sys.stderr)
        round_ratios.append(rates["ours"] / rates["plain"])
    for side in totals.values():
        side[f"{unit}_per_s"] = round(side[unit] / side["seconds"], 2)
        side[f"{unit}_per_cpu_s"] = round(side[unit] / side["cpu_seconds"], 2)
        side["seconds"], side["cpu_seconds"] = round(side["seconds"], 2), round(side["cpu_seconds"], 2)
    ratio = totals["ours"][f"{unit}_per_s"] / totals["plain"][f"{unit}_per_s"]
    cpu_ratio = totals["ours"][f"{unit}_per_cpu_s"] / totals["plain"][f"{unit}_per_cpu_s"]
    return {
        **totals,
        "ratio": round(ratio, 3),
        "median_round_ratio": round(statistics.median(round_ratios), 3),
        "cpu_time_ratio": round(cpu_ratio, 3),
        "meets_target": ratio >= target,
    }
