"""Wall-clock seconds of a job's phases, for its result: operators see where a job's time went.

A job names each phase as it enters it (reported as its progress phase, as before). Each phase has its wall
seconds and the process's CPU seconds: on a machine shared with other work the wall figure grows with the
load while the CPU figure mostly does not, so the two tell a slow job from a busy machine. Training adds the
pairs it stepped through, so its rate is comparable with bench/train_throughput.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from worker.runtime import JobContext


class PhaseClock:
    """Times the phases of one job attempt; `to_dict()` is the result's `phases` entry."""

    def __init__(self, ctx: JobContext) -> None:
        self._ctx = ctx
        self._phases: dict[str, dict[str, Any]] = {}

    @contextmanager
    def phase(self, name: str, *, progress: str | None = None) -> Iterator[dict[str, Any]]:
        """Time the block as phase `name`; with `progress`, report that progress phase first (training
        reports its own). The yielded dict takes the phase's counts, e.g. `pairs`."""
        if progress is not None:
            self._ctx.progress(phase=progress, force=True)
        record: dict[str, Any] = {}
        started, cpu_started = time.perf_counter(), time.process_time()
        try:
            yield record
        finally:
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
            self._phases[name] = {"seconds": seconds, "cpu_seconds": round(cpu, 4), **record}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """{phase: {seconds, cpu_seconds, and its counts}}; training with pairs also has `pairs_per_s`.
        Phases this attempt did not run are absent."""
        out = {}
        for name, record in self._phases.items():
            entry = {**record, "seconds": round(record["seconds"], 4)}
            if "pairs" in record and record["seconds"] > 0:
                entry["pairs_per_s"] = round(record["pairs"] / record["seconds"], 2)
            out[name] = entry
        return out
