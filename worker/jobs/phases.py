"""Wall-clock seconds of a job's phases, for its result: operators see where a job's time went.

A job names each phase as it enters it (reported as its progress phase, as before), and the phase's seconds
run until the next one starts or the job is done. Training adds the pairs it stepped through, so its rate is
comparable with bench/train_throughput.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from worker.runtime import JobContext


class PhaseClock:
    """Times the phases of one job attempt; `to_dict()` is the result's `phases` entry."""

    def __init__(self, ctx: JobContext, clock: Callable[[], float] = time.perf_counter) -> None:
        self._ctx = ctx
        self._clock = clock
        self._phases: dict[str, dict[str, Any]] = {}

    @contextmanager
    def phase(self, name: str, *, progress: str | None = None) -> Iterator[dict[str, Any]]:
        """Time the block as phase `name`; with `progress`, report that progress phase first (training
        reports its own). The yielded dict takes the phase's counts, e.g. `pairs`."""
        if progress is not None:
            self._ctx.progress(phase=progress, force=True)
        record: dict[str, Any] = {}
        started = self._clock()
        try:
            yield record
        finally:
            self._phases[name] = {"seconds": self._clock() - started, **record}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """{phase: {seconds, and its counts}}; training with pairs also has `pairs_per_s`. Phases this
        attempt did not run are absent."""
        out = {}
        for name, record in self._phases.items():
            entry = {**record, "seconds": round(record["seconds"], 4)}
            if "pairs" in record and record["seconds"] > 0:
                entry["pairs_per_s"] = round(record["pairs"] / record["seconds"], 2)
            out[name] = entry
        return out
