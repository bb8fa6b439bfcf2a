"""One handler per job kind, each `run(ctx: JobContext) -> result dict`.

Handlers import torch, so the table names modules, not functions: a handler module is imported only when a
job of its kind runs (in the Celery child process), never when the worker's parent process loads its tasks.
"""

from importlib import import_module
from types import MappingProxyType

from app.domain import JobKind, parse
from worker.runtime import Handler

# Every JobKind has exactly one module here; tests/worker/test_handler_table.py imports each one.
HANDLER_MODULES: MappingProxyType[JobKind, str] = MappingProxyType(
    {
        JobKind.FINETUNE: "worker.jobs.finetune",
        JobKind.EVALUATE: "worker.jobs.evaluate",
        JobKind.REINDEX: "worker.jobs.reindex",
        JobKind.VALIDATE_MODEL: "worker.jobs.validate_model",
        # One embedding pass for both: embed every face the model is missing (the embed queue runs `embed`).
        JobKind.EMBED: "worker.jobs.reindex",
    }
)
KINDS: tuple[str, ...] = tuple(kind.value for kind in HANDLER_MODULES)


def handler_for(kind: str) -> Handler:
    known = parse(JobKind, kind)
    if known is None or known not in HANDLER_MODULES:
        raise ValueError(f"no handler for job kind {kind!r}; kinds: {', '.join(KINDS)}")
    return import_module(HANDLER_MODULES[known]).run
