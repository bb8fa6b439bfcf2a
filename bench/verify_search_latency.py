"""Verify and search latency through HTTP at 100k stored faces, 1 and 16 concurrent clients; prints JSON.

Inserts synthetic faces and unit-vector embeddings of one serving model straight into a fresh PostgreSQL
database (COPY), starts a real `magtune serve`, loads the search index with one request (timed apart), then
for each route and each concurrency sends requests from that many httpx async clients for a fixed time and
reports p50/p99 latency and requests/s, each with the load average read when it was measured (the machine
is shared: read every figure beside its load).

    python bench/verify_search_latency.py [--faces 100000] [--dim 512] [--seconds 15] [--concurrency 1 16]

Needs PostgreSQL (MAGTUNE_TEST_POSTGRES, an admin URL) and Redis (MAGTUNE_TEST_REDIS) like the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from processes import (
    free_port,
    fresh_database,
    libpq_url,
    load_averages,
    magtune,
    migrated_env,
    print_report,
    server,
    uptime,
)

FACES_PER_SUBJECT = 10
COPY_CHUNK = 20_000


def insert_data(database_url: str, faces: int, dim: int, seed: int) -> tuple[list[uuid.UUID], uuid.UUID]:
    """Faces with subjects and sources, a ready model that serves (activation embedded), its embeddings."""
    import psycopg
    from sqlalchemy.orm import Session

    from app.db import get_engine
    from app.tables import Activation, EmbeddingGeneration, ModelVersion, utcnow

    with Session(get_engine(database_url)) as session, session.begin():
        model = ModelVersion(
            arch="mobilefacenet",
            status="ready",
            sha256="ab" * 32,
            byte_size=1,
            embedding_size=dim,
            threshold=0.4,
        )
        session.add(model)
        session.flush()
        model_id = model.id
    rng = np.random.default_rng(seed)
    ids = [uuid.UUID(bytes=bytes(rng.integers(0, 256, 16, dtype=np.uint8)), version=4) for _ in range(faces)]
    now = utcnow()
    with psycopg.connect(libpq_url(database_url)) as conn, conn.cursor() as cur:
        with cur.copy(
            "COPY faces (id, sha256, byte_size, media_type, width, height, channels, split, subject, source,"
            " created_at) FROM STDIN"
        ) as copy:
            for i, face_id in enumerate(ids):
                sha = hashlib.sha256(face_id.bytes).hexdigest()
                subject = f"person{i // FACES_PER_SUBJECT}"
                copy.write_row(
                    (face_id, sha, 1, "image/png", 112, 112, 3, "train", subject, f"src{i % 3}", now)
                )
        with cur.copy(
            "COPY embeddings (face_id, model_id, vector, quality, created_at, generation) FROM STDIN"
        ) as copy:
            for start in range(0, faces, COPY_CHUNK):
                x = rng.standard_normal((min(COPY_CHUNK, faces - start), dim)).astype(np.float32)
                x /= np.linalg.norm(x, axis=1, keepdims=True)
                for face_id, row in zip(ids[start : start + len(x)], x, strict=True):
                    copy.write_row((face_id, model_id, row.astype("<f4").tobytes(), 1.0, now, 1))
    with Session(get_engine(database_url)) as session, session.begin():
        session.add(EmbeddingGeneration(model_id=model_id, generation=1))
        session.add(Activation(model_id=model_id, actor="bench", embedded_at=utcnow()))
    return ids, model_id


async def measure(
    base_url: str, route: str, faces: list[uuid.UUID], concurrency: int, seconds: float
) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds

    async def client_loop(worker: int) -> None:
        nonlocal errors
        rng = random.Random(worker)
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
            while time.monotonic() < deadline:
                if route == "verify":
                    a, b = rng.sample(faces, 2)
                    body: dict[str, Any] = {"face_a": str(a), "face_b": str(b)}
                else:
                    body = {"face": str(rng.choice(faces)), "k": 10}
                started = time.perf_counter()
                response = await client.post(f"/v1/{route}", json=body)
                elapsed = time.perf_counter() - started
                if response.status_code == 200:
                    latencies.append(elapsed)
                else:
                    errors += 1

    started = time.monotonic()
    await asyncio.gather(*(client_loop(worker) for worker in range(concurrency)))
    wall = time.monotonic() - started
    ordered = sorted(latencies)

    def ms(q: float) -> float:
        return (
            round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)
            if ordered
            else float("nan")
        )

    return {
        "route": f"POST /v1/{route}",
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "requests_per_s": round(len(latencies) / wall, 1),
        "p50_ms": ms(0.5),
        "p99_ms": ms(0.99),
        "mean_ms": round(1000 * statistics.fmean(latencies), 2) if latencies else None,
        "load_average": load_averages(),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    with tempfile.TemporaryDirectory(prefix="magtune-bench-") as tmp, fresh_database() as database_url:
        env = migrated_env(database_url, tmp)
        started = time.monotonic()
        faces, model_id = insert_data(database_url, args.faces, args.dim, args.seed)
        insert_s = time.monotonic() - started
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        api = magtune("serve", "--host", "127.0.0.1", "--port", str(port))
        with server(api, env, f"{base_url}/readyz", Path(tmp) / "api.log"):
            started = time.monotonic()
            first = httpx.post(f"{base_url}/v1/search", json={"face": str(faces[0])}, timeout=600)
            first.raise_for_status()
            index_load_s = time.monotonic() - started
            load_after_index = load_averages()
            figures = [
                asyncio.run(measure(base_url, route, faces, concurrency, args.seconds))
                for route in ("verify", "search")
                for concurrency in args.concurrency
            ]
    return {
        "benchmark": "verify_search_latency",
        "database": "postgresql",
        "server": "magtune serve (uvicorn, one process)",
        "client": "httpx.AsyncClient per concurrent client, keep-alive, fixed duration",
        "cpu_count": os.cpu_count(),
        "faces": args.faces,
        "dim": args.dim,
        "model_id": str(model_id),
        "insert_s": round(insert_s, 1),
        "first_search_s (index load)": round(index_load_s, 2),
        "load_average_after_index_load": load_after_index,
        "seconds_per_figure": args.seconds,
        "figures": figures,
        "uptime": uptime(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faces", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--seconds", type=float, default=15.0, help="per route and concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print_report(run(args))


if __name__ == "__main__":
    main()
