"""Feedback ingest through the api, beside a bare FastAPI endpoint that does one plain INSERT; prints JSON.

Both run as uvicorn subprocesses (`magtune serve`, and this file's bare app served the same way) against the
same fresh PostgreSQL database and the same `feedback` table, and one client loop drives both, so the ratio
is the api's own cost: validation, face lookups, splits, idempotency, metrics, problem handling, and the API
key check (the api sends a key made with `magtune keys create`). Single posts also go to a third server, the
api with MAGTUNE_AUTH_DISABLED=true, so the key check's own cost is reported (`key_check_cost_p50_ms`).

Concurrent clients (`--clients 1,16,64`): single posts from that many async clients at once, each level for
`--seconds`, to the api served with `--api-workers` processes (`magtune serve --workers`), to the same bare
synchronous endpoint, and to a strong reference: an async FastAPI endpoint doing one INSERT through an async
psycopg pool, served with as many processes (bench/concurrent_clients.py).

    python bench/api_ingest.py [--singles 2000] [--batches 5] [--batch-size 10000] [--clients 1,16,64]

Needs PostgreSQL (MAGTUNE_TEST_POSTGRES, an admin URL) and Redis (MAGTUNE_TEST_REDIS) like the tests.
Targets: single posts at ≥ 0.7× the bare endpoint's rate; batches at ≥ 20,000 pairs/s; at 16 and 64 clients
≥ 0.7× the async reference's throughput, with p99 ≤ 100 ms at 16 clients.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from concurrent_clients import drive
from processes import (
    api_key,
    free_port,
    fresh_database,
    libpq_url,
    load_averages,
    magtune,
    migrated_env,
    print_report,
    server,
)
from pydantic import BaseModel

SINGLE_TARGET_RATIO = 0.7
BATCH_TARGET_PAIRS_PER_S = 20_000
CONCURRENT_TARGET_RATIO = 0.7
CONCURRENT_TARGET_P99_MS_AT_16 = 100.0
WARMUP_REQUESTS = 100


# The bare baseline: one endpoint, one INSERT, nothing else.


class PairIn(BaseModel):
    face_a: uuid.UUID
    face_b: uuid.UUID
    label: int


class BatchIn(BaseModel):
    items: list[PairIn]


def create_bare_app() -> Any:
    from fastapi import FastAPI
    from sqlalchemy import insert

    from app.config import get_settings
    from app.db import get_engine
    from app.tables import FeedbackPair

    engine = get_engine(get_settings().database_url)
    table = FeedbackPair.__table__
    app = FastAPI()

    def row(pair: PairIn) -> dict[str, Any]:
        a, b = sorted((pair.face_a, pair.face_b))
        return {"id": uuid.uuid4(), "face_a": a, "face_b": b, "label": pair.label, "split": "train"}

    @app.post("/bare/feedback", status_code=201)
    def bare_feedback(pair: PairIn) -> dict[str, Any]:
        values = row(pair)
        with engine.begin() as conn:
            conn.execute(insert(table).values(**values))
        return {"id": str(values["id"])}

    @app.post("/bare/feedback/batch")
    def bare_batch(batch: BatchIn) -> dict[str, int]:
        rows = [row(pair) for pair in batch.items]
        with engine.begin() as conn:
            conn.execute(insert(table), rows)
        return {"created": len(rows)}

    @app.get("/bare/ready")
    def ready() -> dict[str, str]:
        return {"status": "ok"}

    return app


# Data.


def random_png(rng: random.Random) -> bytes:
    from PIL import Image

    image = Image.frombytes("RGB", (112, 112), rng.randbytes(112 * 112 * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def upload_faces(client: Any, count: int) -> list[str]:
    rng = random.Random(0)
    ids = []
    for _ in range(count):
        response = client.post("/v1/faces", files={"file": ("face.png", random_png(rng), "image/png")})
        response.raise_for_status()
        ids.append(response.json()["id"])
    return ids


# Measurement.


def timed(send: Callable[[], Any]) -> float:
    started = time.perf_counter()
    send()
    return time.perf_counter() - started


def summary(latencies: list[float], records_per_request: int) -> dict[str, Any]:
    ordered = sorted(latencies)
    total = sum(ordered)
    return {
        "requests": len(ordered),
        "records_per_s": round(len(ordered) * records_per_request / total, 1),
        "p50_ms": round(1000 * statistics.median(ordered), 3),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3),
    }


def post_single(client: Any, url: str, pair: tuple[str, str], label: int) -> None:
    response = client.post(url, json={"face_a": pair[0], "face_b": pair[1], "label": label})
    if response.status_code != 201:
        raise RuntimeError(f"{url}: {response.status_code} {response.text[:500]}")


def post_batch(client: Any, url: str, pairs: list[tuple[str, str]]) -> None:
    items = [{"face_a": a, "face_b": b, "label": index % 2} for index, (a, b) in enumerate(pairs)]
    response = client.post(url, json={"items": items})
    response.raise_for_status()
    if response.json()["created"] != len(items):
        raise RuntimeError(f"{url}: not every pair was created: {response.text[:500]}")


SINGLE_URLS = {"api": "/v1/feedback", "api_auth_off": "/v1/feedback", "bare_insert": "/bare/feedback"}


def warm_up_singles(clients: dict[str, Any], pairs: Iterator[tuple[str, str]]) -> None:
    for name, url in SINGLE_URLS.items():
        for index in range(WARMUP_REQUESTS):
            post_single(clients[name], url, next(pairs), index % 2)


def measure_singles(
    clients: dict[str, Any], pairs: Iterator[tuple[str, str]], count: int
) -> dict[str, list[float]]:
    """`count` timed posts per server, one server after the other post by post, so that background load and
    the database's growth (faces gaining labels) reach every server alike."""
    urls = SINGLE_URLS
    latencies: dict[str, list[float]] = {name: [] for name in urls}
    for index in range(count):
        for name, url in urls.items():
            pair = next(pairs)
            latencies[name].append(
                timed(lambda n=name, u=url, p=pair, i=index: post_single(clients[n], u, p, i % 2))
            )
    return latencies


def labelled_share(database_url: str) -> float:
    """The share of faces some stored pair names: a single post of two such faces takes the one-statement
    path (app/feedback/settled.py), one naming a face without labels the general path."""
    import psycopg

    with psycopg.connect(libpq_url(database_url)) as conn:
        total, labelled = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE EXISTS (SELECT 1 FROM feedback "
            "WHERE feedback.face_a = faces.id OR feedback.face_b = faces.id)) FROM faces"
        ).fetchone()
    return round(labelled / total, 3) if total else 0.0


def insert_only(database_url: str, pairs: list[tuple[str, str]]) -> None:
    """The api's own batch INSERT (app.feedback.service), its columns ready-made, sent straight through
    psycopg and committed: what the database alone costs, the floor under any batch endpoint."""
    import psycopg

    from app.feedback.service import PG_INSERT, pg_insert_parameters, uuid_ints

    canonical = [sorted((uuid.UUID(a), uuid.UUID(b))) for a, b in pairs]
    now = datetime.now(UTC)
    rows = [
        {
            "id": uuid.uuid4(),
            "face_a": a,
            "face_b": b,
            "label": index % 2,
            "split": "train",
            "annotator": None,
            "source": None,
            "api_key_id": None,
            "created_at": now,
        }
        for index, (a, b) in enumerate(canonical)
    ]
    with psycopg.connect(libpq_url(database_url)) as conn:
        inserted = uuid_ints(conn.execute(PG_INSERT, pg_insert_parameters(rows)).fetchone()[0])
    if len(inserted) != len(rows):
        raise RuntimeError(f"insert only: {len(inserted)} of {len(rows)} pairs inserted")


def measure_batches(
    clients: dict[str, Any], pairs: Iterator[tuple[str, str]], batches: int, size: int, database_url: str
) -> dict[str, list[float]]:
    urls = {"api": "/v1/feedback/batch", "bare_insert": "/bare/feedback/batch"}
    latencies: dict[str, list[float]] = {name: [] for name in [*urls, "database_insert_only"]}
    for name, url in urls.items():
        post_batch(clients[name], url, list(itertools.islice(pairs, size)))  # warm-up
    for _batch in range(batches):
        for name, url in urls.items():
            chunk = list(itertools.islice(pairs, size))
            latencies[name].append(timed(lambda n=name, u=url, c=chunk: post_batch(clients[n], u, c)))
        chunk = list(itertools.islice(pairs, size))
        latencies["database_insert_only"].append(timed(lambda c=chunk: insert_only(database_url, c)))
    return latencies


def faces_needed(pair_count: int) -> int:
    faces = 2
    while faces * (faces - 1) // 2 < pair_count:
        faces += 1
    return faces


def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    # Concurrent levels: a generous bound of 3,000 requests/s per server and level.
    concurrent_pairs = 3 * len(args.clients) * int(3000 * args.seconds)
    pair_count = (
        3 * (args.singles + WARMUP_REQUESTS) + 3 * (args.batches + 1) * args.batch_size + concurrent_pairs
    )
    face_count = faces_needed(pair_count)
    with tempfile.TemporaryDirectory(prefix="magtune-bench-") as tmp, fresh_database() as database_url:
        env = migrated_env(database_url, tmp, MAGTUNE_MAX_FEEDBACK_BATCH=str(max(args.batch_size, 10_000)))
        key = api_key(env)
        api_port, open_port, bare_port = free_port(), free_port(), free_port()
        api = magtune("serve", "--host", "127.0.0.1", "--port", str(api_port))
        api_open = magtune("serve", "--host", "127.0.0.1", "--port", str(open_port))
        bare = [sys.executable, str(Path(__file__).resolve()), "--serve-bare", "--port", str(bare_port)]
        open_env = {**env, "MAGTUNE_AUTH_DISABLED": "true"}
        with (
            server(api, env, f"http://127.0.0.1:{api_port}/readyz", Path(tmp) / "api.log"),
            server(api_open, open_env, f"http://127.0.0.1:{open_port}/readyz", Path(tmp) / "api-open.log"),
            server(bare, env, f"http://127.0.0.1:{bare_port}/bare/ready", Path(tmp) / "bare.log"),
            httpx.Client(
                base_url=f"http://127.0.0.1:{api_port}",
                timeout=300,
                headers={"Authorization": f"Bearer {key}"},
            ) as api_client,
            httpx.Client(base_url=f"http://127.0.0.1:{open_port}", timeout=300) as open_client,
            httpx.Client(base_url=f"http://127.0.0.1:{bare_port}", timeout=300) as bare_client,
        ):
            clients = {"api": api_client, "api_auth_off": open_client, "bare_insert": bare_client}
            face_ids = upload_faces(api_client, face_count)
            all_pairs = list(itertools.combinations(face_ids, 2))
            random.Random(1).shuffle(all_pairs)
            pairs = iter(all_pairs)
            warm_up_singles(clients, pairs)
            labelled_before = labelled_share(database_url)
            singles = measure_singles(clients, pairs, args.singles)
            labelled_after = labelled_share(database_url)
            batches = measure_batches(clients, pairs, args.batches, args.batch_size, database_url)
            concurrent = (
                measure_concurrent(args, env, Path(tmp), key, bare_port, pairs) if args.clients else None
            )

    single = {name: summary(values, 1) for name, values in singles.items()}
    batch = {name: summary(values, args.batch_size) for name, values in batches.items()}
    ratio = single["api"]["records_per_s"] / single["bare_insert"]["records_per_s"]
    key_check_ms = single["api"]["p50_ms"] - single["api_auth_off"]["p50_ms"]
    return {
        "benchmark": "api_ingest",
        "database": "postgresql",
        "server": "uvicorn, one process each",
        "client": "one httpx client, sequential requests, keep-alive",
        "cpu_count": os.cpu_count(),
        "load_average_1m": load_averages()[0],
        "faces": face_count,
        "single": {
            **single,
            "api_to_bare_ratio": round(ratio, 3),
            "auth_off_to_bare_ratio": round(
                single["api_auth_off"]["records_per_s"] / single["bare_insert"]["records_per_s"], 3
            ),
            "key_check_cost_p50_ms": round(key_check_ms, 3),
            "faces_with_labels_share": {"before": labelled_before, "after": labelled_after},
            "target_ratio": SINGLE_TARGET_RATIO,
            "meets_target": ratio >= SINGLE_TARGET_RATIO,
        },
        "batch": {
            "batch_size": args.batch_size,
            **batch,
            "target_pairs_per_s": BATCH_TARGET_PAIRS_PER_S,
            "meets_target": batch["api"]["records_per_s"] >= BATCH_TARGET_PAIRS_PER_S,
        },
        **({"concurrent": concurrent} if concurrent is not None else {}),
    }


def measure_concurrent(
    args: argparse.Namespace, env: dict[str, str], tmp: Path, key: str, bare_port: int, pairs: Iterator[Any]
) -> dict[str, Any]:
    """Each client count against the api (N processes), the async reference (N processes) and the sync bare
    endpoint (one process, as above), in turn."""
    api_port, ref_port = free_port(), free_port()
    workers = str(args.api_workers)
    api = magtune("serve", "--host", "127.0.0.1", "--port", str(api_port), "--workers", workers)
    ref = [sys.executable, str(Path(__file__).resolve()), "--serve-reference", "--port", str(ref_port)]
    ref_env = {**env, "BENCH_REFERENCE_WORKERS": workers}
    targets = {
        "api": (f"http://127.0.0.1:{api_port}", "/v1/feedback", {"Authorization": f"Bearer {key}"}),
        "async_reference": (f"http://127.0.0.1:{ref_port}", "/ref/feedback", {}),
        "sync_bare": (f"http://127.0.0.1:{bare_port}", "/bare/feedback", {}),
    }
    levels = []
    with (
        server(api, env, f"http://127.0.0.1:{api_port}/readyz", tmp / "api-workers.log"),
        server(ref, ref_env, f"http://127.0.0.1:{ref_port}/ref/ready", tmp / "reference.log"),
    ):
        for url, path, headers in targets.values():  # warm every process's connections
            drive(url, path, headers, pairs, max(args.clients), 1.0)
        for clients in args.clients:
            level: dict[str, Any] = {"clients": clients}
            for name, (url, path, headers) in targets.items():
                level[name] = drive(url, path, headers, pairs, clients, args.seconds)
            level["api_to_reference_ratio"] = round(
                level["api"]["requests_per_s"] / level["async_reference"]["requests_per_s"], 3
            )
            levels.append(level)
    judged = [level for level in levels if level["clients"] in (16, 64)]
    at_16 = [level for level in levels if level["clients"] == 16]
    return {
        "api_workers": args.api_workers,
        "reference_workers": args.api_workers,
        "seconds_per_level": args.seconds,
        "client": "httpx.AsyncClient per client, keep-alive, in this one process",
        "levels": levels,
        "target_ratio": CONCURRENT_TARGET_RATIO,
        "target_p99_ms_at_16": CONCURRENT_TARGET_P99_MS_AT_16,
        "meets_target": bool(judged)
        and all(level["api_to_reference_ratio"] >= CONCURRENT_TARGET_RATIO for level in judged)
        and all(level["api"]["p99_ms"] <= CONCURRENT_TARGET_P99_MS_AT_16 for level in at_16),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--singles", type=int, default=2000, help="timed single posts per server")
    parser.add_argument("--batches", type=int, default=5, help="timed batches per server")
    parser.add_argument("--batch-size", type=int, default=10_000)
    parser.add_argument(
        "--clients",
        type=lambda text: [int(part) for part in text.split(",") if part],
        default=[1, 16, 64],
        help="concurrent client counts, comma-separated (empty: skip)",
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="per client count and server")
    parser.add_argument("--api-workers", type=int, default=os.cpu_count() or 1, help="processes per server")
    parser.add_argument("--serve-bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-reference", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        from worker.cli.service_commands import serve_app

        serve_app(f"{__name__}:create_bare_app", host="127.0.0.1", port=args.port, factory=True)
        return
    if args.serve_reference:
        from worker.cli.service_commands import serve_app

        workers = int(os.environ.get("BENCH_REFERENCE_WORKERS", "1"))
        serve_app(
            "concurrent_clients:create_async_reference_app",
            host="127.0.0.1",
            port=args.port,
            factory=True,
            workers=workers,
        )
        return
    print_report(run(args))


if __name__ == "__main__":
    main()
