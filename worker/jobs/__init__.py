"""One handler per job kind, each `run(ctx: JobContext) -> result dict`.

Handlers import torch, so a handler module is imported only when a job of its kind runs (in the Celery child
process), never when the worker's parent process loads its tasks.
"""

from importlib import import_module

from worker.runtime import Handler

KINDS: tuple[str, ...] = ("finetune", "evaluate", "reindex", "validate_model")


def handler_for(kind: str) -> Handler:
    if kind not in KINDS:
        raise ValueError(f"no handler for job kind {kind!r}; kinds: {', '.join(KINDS)}")
    return import_module(f"{__name__}.{kind}").run
