"""Commands that run the service: the api, the worker, both at once (embedded), migrations, a sweep, import.

Each handler imports what it needs when it runs: `magtune serve` must never load torch, and `magtune --help`
stays instant.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

from worker.cli.output import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, CommandError, emit, error

DEFAULT_HOST = "127.0.0.1"
API_KEY_ENV = "MAGTUNE_API_KEY"
DEFAULT_PORT = 8000
API_APP = "app.main:create_app"


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_up(subparsers)
    _register_migrate(subparsers)
    _register_serve(subparsers)
    _register_worker(subparsers)
    _register_sweep(subparsers)
    _register_import(subparsers)
    _register_reindex(subparsers)


def _add_key_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help=f"the API key to send (default: ${API_KEY_ENV}); prefer the variable: options show in `ps`",
    )


def api_key(args: argparse.Namespace) -> str | None:
    return args.api_key or os.environ.get(API_KEY_ENV) or None


def _refuse_unsafe_bind(command: str, host: str) -> bool:
    """True (after saying why) when auth is off and `host` is not loopback."""
    from app.auth.startup import refuse_unsafe_bind
    from app.config import Settings

    why = refuse_unsafe_bind(Settings(), host)
    if why is not None:
        error(command, why)
    return why is not None


def _add_listen_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")


def _register_up(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "up",
        help="run the whole service on this machine: migrate, then the api and one worker",
        description="Embedded mode: SQLite and the SQLAlchemy broker under the data directory unless "
        "MAGTUNE_DATABASE_URL / MAGTUNE_BROKER_URL say otherwise. Once both processes are ready it prints "
        "the api and docs URLs, the data directory, the database and the broker. Ctrl-C stops both "
        "processes. Long-running: no --json.",
    )
    _add_listen_options(parser)
    parser.add_argument(
        "--data-dir", help="where the database, broker and blobs live (sets MAGTUNE_DATA_DIR)"
    )
    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=30.0,
        help="seconds to wait for a clean stop before killing (default 30; a second Ctrl-C kills at once)",
    )
    parser.set_defaults(handler=run_up)


def run_up(args: argparse.Namespace) -> int:
    from worker.cli.embedded import run_embedded

    if _refuse_unsafe_bind("up", args.host):
        return EXIT_BAD_INPUT
    return run_embedded(
        host=args.host, port=args.port, data_dir=args.data_dir, stop_timeout_s=args.stop_timeout
    )


def _register_migrate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "migrate", help="bring the database schema up to date (alembic upgrade head)"
    )
    parser.add_argument(
        "--json", action="store_true", help='print {"database": URL, "revision": REVISION} as JSON'
    )
    parser.set_defaults(handler=run_migrate)


def run_migrate(args: argparse.Namespace) -> int:
    from sqlalchemy.engine import make_url

    from app.config import get_settings
    from app.migrate import current_revision, upgrade_database

    settings = get_settings()
    upgrade_database(settings.database_url)
    result = {
        "database": make_url(settings.database_url).render_as_string(hide_password=True),
        "revision": current_revision(settings.database_url),
    }
    emit(result, as_json=args.json, render=_render_migrate)
    return EXIT_OK


def _render_migrate(result: dict[str, Any]) -> str:
    return f"database {result['database']} is up to date (revision {result['revision']})"


def _register_serve(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the api (uvicorn)",
        description="Runs the api until stopped. Long-running: no --json.",
    )
    _add_listen_options(parser)
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    parser.add_argument(
        "--workers",
        type=_workers,
        default=1,
        help="api processes sharing the port (uvicorn workers; default 1). Each runs the app and its "
        f"sweeper; per-process state (the write-rate limit) applies in each. At most {MAX_API_WORKERS}.",
    )
    parser.set_defaults(handler=run_serve)


MAX_API_WORKERS = 64


def _workers(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= count <= MAX_API_WORKERS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_API_WORKERS}")
    return count


# The api runs BLAS single-threaded: its parallelism is concurrent requests, and a multi-threaded BLAS under
# 16 request threads on 2 cores measured 10 searches/s instead of 1,300 (an index of 2,000 faces). The large
# scans of the search index run on faiss's own OpenMP threads, which this does not limit.
API_BLAS_THREADS = "1"


def run_serve(args: argparse.Namespace) -> int:
    if _refuse_unsafe_bind("serve", args.host):
        return EXIT_BAD_INPUT
    os.environ.setdefault("OPENBLAS_NUM_THREADS", API_BLAS_THREADS)  # read when numpy loads, later than this
    from app.memory import return_large_blocks_to_the_os

    return_large_blocks_to_the_os()  # decoded uploads' bitmaps must not stay with each request thread
    if args.workers == 1:
        serve_app(API_APP, host=args.host, port=args.port, log_level=args.log_level, factory=True)
        return EXIT_OK
    with _prometheus_dir():
        serve_app(
            API_APP,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            factory=True,
            workers=args.workers,
        )
    return EXIT_OK


@contextlib.contextmanager
def _prometheus_dir() -> Iterator[None]:
    """Several api processes share `/metrics` figures through prometheus_client's multiprocess mode: a
    fresh directory for this run unless PROMETHEUS_MULTIPROC_DIR names one (app/observability.py)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        yield
        return
    with tempfile.TemporaryDirectory(prefix="magtune-metrics-") as directory:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory  # the workers inherit it when they start
        try:
            yield
        finally:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)


def serve_app(
    app: str, *, host: str, port: int, log_level: str = "info", factory: bool = False, workers: int = 1
) -> None:
    """uvicorn as the api runs it; `bench/` serves its bare baseline through here too, to compare alike.

    With `workers` above 1 uvicorn's supervisor starts that many processes, each importing `app` and
    sharing the listening socket; the kernel spreads connections over them."""
    import uvicorn

    uvicorn.run(
        app,
        factory=factory,
        host=host,
        port=port,
        log_level=log_level,
        log_config=_log_config(log_level),
        proxy_headers=True,
        workers=workers if workers > 1 else None,
    )


def _log_config(level: str) -> dict[str, Any]:
    """uvicorn's own logging plus the service's loggers (`app.*`: the sweeper, the queue), which it omits."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["app"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


def _register_worker(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="run a Celery worker for the job queue",
        description="One job at a time per GPU: prefork pool, and a fresh child process for every job so "
        "that no CUDA state outlives a job and the parent process never touches CUDA. On the embed queue "
        "(MAGTUNE_EMBED_QUEUE_NAME) the child process is kept for MAGTUNE_EMBED_WORKER_MAX_TASKS_PER_CHILD "
        "jobs, so that small embedding jobs reuse its loaded models. Long-running: no --json.",
    )
    parser.add_argument(
        "--queue", help="queue to consume: gpu or embed (default: MAGTUNE_QUEUE_NAME, else gpu)"
    )
    parser.add_argument("--concurrency", type=int, default=1, help="jobs at once (default 1: one per GPU)")
    parser.add_argument("--loglevel", default="INFO", help="Celery log level (default INFO)")
    parser.add_argument(
        "--name",
        help="Celery node name, e.g. gpu1@%%h, for several workers on one machine (default celery@%%h, or "
        "embed@%%h on the embed queue); it begins the worker name that jobs and chunks record",
    )
    parser.set_defaults(handler=run_worker)


def run_worker(args: argparse.Namespace) -> int:
    from app.config import get_settings
    from worker.celery_app import celery_app

    settings = get_settings()
    queue = args.queue or settings.queue_name
    # A long gpu job gets a fresh child (no CUDA state outlives it); embed jobs are small and many, so their
    # child is kept and pays the torch import and model load once (worker/jobs/model_cache.py). The embed
    # worker's node is `embed@host`, so it and a gpu worker (`celery@host`) can share a machine.
    per_child = settings.embed_worker_max_tasks_per_child if queue == settings.embed_queue_name else 1
    argv = [
        "worker",
        "--queues",
        queue,
        "--concurrency",
        str(args.concurrency),
        "--pool",
        "prefork",
        "--max-tasks-per-child",
        str(per_child),
        *(["--hostname", args.name] if args.name else []),
        *(["--hostname", f"{queue}@%h"] if queue == settings.embed_queue_name and not args.name else []),
        "--prefetch-multiplier",
        "1",
        "--loglevel",
        args.loglevel,
    ]
    return int(celery_app.start(argv=argv) or EXIT_OK)


def _register_sweep(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="one pass of the job sweeper (re-send lost messages, recover jobs of dead workers); prints JSON",
        description="The api runs this every MAGTUNE_SWEEP_INTERVAL_S; this command is for cron or for an "
        "operator without a running api. Prints one JSON document: the ids of the jobs it re-sent, "
        "requeued or failed, and their counts.",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the report as JSON (the only form it has; for uniformity)"
    )
    parser.set_defaults(handler=run_sweep)


def run_sweep(_args: argparse.Namespace) -> int:
    from app.config import get_settings
    from app.jobs.sweeper import sweep_once

    report = sweep_once(get_settings())
    emit(_sweep_json(dataclasses.asdict(report)), as_json=True, render=str)
    return EXIT_OK


def _sweep_json(report: dict[str, list[uuid.UUID] | int]) -> dict[str, Any]:
    """The ids of what each step touched, and their counts (steps that count files give a number)."""
    return {
        "counts": {name: len(ids) if isinstance(ids, list) else ids for name, ids in report.items()},
        **{name: [str(i) for i in ids] for name, ids in report.items() if isinstance(ids, list)},
    }


def _register_import(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import",
        help="upload the images of a feedback file and post its pairs to a running api",
        description='Reads the feedback format [{"image1": path, "image2": path, "label": 1 or 0}] (paths '
        "relative to the file). Each distinct image is uploaded once; only image bytes and pairs of face "
        "ids reach the server, never paths.",
    )
    parser.add_argument("feedback_json", metavar="FEEDBACK_JSON")
    parser.add_argument(
        "--api", required=True, metavar="URL", help="the api's base URL, e.g. http://127.0.0.1:8000"
    )
    parser.add_argument(
        "--regression",
        action="store_true",
        help="post the pairs to the regression set: scored by the promotion gate, never trained on",
    )
    parser.add_argument("--source", default="magtune import", help="source recorded on faces and pairs")
    parser.add_argument("--annotator", help="annotator recorded on the pairs")
    parser.add_argument("--chunk-size", type=int, default=1000, help="pairs per batch request (default 1000)")
    _add_key_option(parser)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(handler=run_import)


def run_import(args: argparse.Namespace) -> int:
    """Exit 0 when everything arrived, 1 when the api refused some images or pairs, 2 on bad input."""
    from worker.cli.feedback_import import import_feedback

    try:
        result = import_feedback(
            args.feedback_json,
            api_url=args.api,
            regression=args.regression,
            source=args.source,
            annotator=args.annotator,
            chunk_size=args.chunk_size,
            timeout_s=args.timeout,
            api_key=api_key(args),
        )
    except (CommandError, OSError) as exc:
        error(args.command, str(exc))
        return EXIT_BAD_INPUT
    emit(result, as_json=args.json, render=_render_import)
    refused = result["faces"]["rejected"] + result["pairs"]["rejected"]
    return EXIT_FAILED if refused else EXIT_OK


def _render_import(result: dict[str, Any]) -> str:
    faces, pairs = result["faces"], result["pairs"]
    lines = [
        f"read {result['rows']} pairs naming {result['images']} images from {result['input']}",
        f"faces: {faces['created']} uploaded, {faces['existing']} already stored, "
        f"{faces['rejected']} refused",
        f"pairs ({result['split'] or 'split by face'}): {pairs['created']} created, "
        f"{pairs['existing']} already recorded, {pairs['rejected']} refused, "
        f"{pairs['same_face']} skipped (both images are one face), "
        f"{pairs['bad_image']} skipped (an image was refused)",
        f"pairs across splits (used neither to train nor to evaluate): {pairs['cross']}",
    ]
    lines += [f"  {problem}" for problem in result["rejections"]]
    return "\n".join(lines)


def _register_reindex(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "reindex",
        help="re-embed every stored face with a model, as a job on a running api",
        description="Starts a reindex job (POST /v1/jobs); with --wait, follows it to the end. The worker "
        "embeds every face in batches and records each face's quality (the embedding's norm).",
    )
    parser.add_argument(
        "--api", required=True, metavar="URL", help="the api's base URL, e.g. http://127.0.0.1:8000"
    )
    parser.add_argument("--model", metavar="ID", help="the model to embed with (default: the active one)")
    parser.add_argument("--wait", action="store_true", help="poll the job until it finishes")
    parser.add_argument("--poll-interval", type=float, default=2.0, help="seconds between polls (default 2)")
    _add_key_option(parser)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")
    parser.add_argument("--json", action="store_true", help="print the job as JSON")
    parser.set_defaults(handler=run_reindex)


def run_reindex(args: argparse.Namespace) -> int:
    """Exit 0 when the job was queued (or, with --wait, succeeded), 1 when it failed, 2 when refused."""
    from app.domain import JobKind, JobStatus
    from worker.cli.api_client import ApiClient, ApiRefused
    from worker.cli.job_follow import follow_job

    client = ApiClient(args.api, args.timeout, api_key(args))
    params = {"model": args.model} if args.model else {}
    try:
        _status, job = client.post_json("/v1/jobs", {"kind": JobKind.REINDEX, "params": params})
        if args.wait:
            job = follow_job(client, job["id"], poll_interval_s=args.poll_interval, quiet=args.json)
    except (ApiRefused, CommandError) as exc:
        error(args.command, str(exc))
        return EXIT_BAD_INPUT
    emit(job, as_json=args.json, render=_render_job)
    return (
        EXIT_OK
        if job["status"] in {JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED}
        else EXIT_FAILED
    )


def _render_job(job: dict[str, Any]) -> str:
    line = f"job {job['id']} ({job['kind']}): {job['status']}"
    if job.get("result"):
        line += "\n" + json.dumps(job["result"], indent=2)
    if job.get("error"):
        line += f"\nerror: {job['error'].get('title')}: {job['error'].get('detail')}"
    return line
