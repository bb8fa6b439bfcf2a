"""Loaded models kept in a worker's child process between jobs, for the embedding pass.

The embed worker keeps its child process for many jobs (`MAGTUNE_EMBED_WORKER_MAX_TASKS_PER_CHILD`), and an
embed job is often a handful of faces: importing torch and loading the checkpoint costs seconds, embedding a
few faces tens of milliseconds. So the child keeps the last few models it loaded, already on its device. A
model is keyed by its id and checkpoint sha256, so a cached entry can never stand for other weights. On the
gpu queue every job gets a fresh child, and the cache lives and dies with that one job.

Only the embedding pass uses it: it never modifies the backbone. A fine-tune changes the weights it trains, so
it loads its own.
"""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections import OrderedDict

from app.config import Settings
from app.tables import ModelVersion
from worker.jobs.registry import LoadedModel, load_model
from worker.ml.embedding import select_device

# The active model and, during a switch, the serving one: the models new faces are embedded with.
CAPACITY = 2

_models: OrderedDict[tuple[uuid.UUID, str], LoadedModel] = OrderedDict()
_lock = threading.Lock()
_loads = 0


def cached_model(settings: Settings, row: ModelVersion) -> LoadedModel:
    """The row's model, loaded (strictly, see `load_model`) and on this process's device; least recently used
    evicted beyond CAPACITY. The row's current name and threshold are returned with the cached weights."""
    global _loads
    key = (row.id, row.sha256)
    with _lock:
        model = _models.get(key)
        if model is None:
            model = load_model(settings, row)
            model.backbone.to(select_device())
            _loads += 1
            _models[key] = model
            while len(_models) > CAPACITY:
                _models.popitem(last=False)
        _models.move_to_end(key)
    return dataclasses.replace(model, name=row.name, threshold=row.threshold)


def loads() -> int:
    """How many checkpoints this process has loaded through the cache (for tests and benchmarks)."""
    return _loads


def clear() -> None:
    with _lock:
        _models.clear()
