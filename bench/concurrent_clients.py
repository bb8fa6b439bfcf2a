"""Concurrent single posts for bench/api_ingest.py: an async load driver, and the strong reference it is
compared with, an async FastAPI endpoint doing one INSERT through an async psycopg pool.

The driver keeps `clients` requests in flight (one asyncio task per client, each on its own keep-alive
connection) for a fixed time, and reports throughput and latency percentiles.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel


class PairIn(BaseModel):
    face_a: uuid.UUID
    face_b: uuid.UUID
    label: int


def create_async_reference_app() -> Any:
    """POST /ref/feedback: validate, then one INSERT through psycopg's async pool; nothing else."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from psycopg_pool import AsyncConnectionPool

    url = os.environ["MAGTUNE_DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://", 1)
    pool = AsyncConnectionPool(url, min_size=4, max_size=32, open=False)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> Any:
        await pool.open()
        yield
        await pool.close()

    app = FastAPI(lifespan=lifespan)

    @app.post("/ref/feedback", status_code=201)
    async def reference_feedback(pair: PairIn) -> dict[str, str]:
        a, b = sorted((pair.face_a, pair.face_b))
        pair_id = uuid.uuid4()
        async with pool.connection() as conn:
            await conn.execute(
                "INSERT INTO feedback (id, face_a, face_b, label, split, created_at) "
                "VALUES (%s, %s, %s, %s, 'train', now())",
                (pair_id, a, b, pair.label),
            )
        return {"id": str(pair_id)}

    @app.get("/ref/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ok"}

    return app


async def _drive(
    base_url: str,
    path: str,
    headers: dict[str, str],
    pairs: Iterator[tuple[str, str]],
    clients: int,
    seconds: float,
) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    failures: Counter[str] = Counter()
    counter = itertools.count()
    deadline = time.perf_counter() + seconds

    async def client_loop() -> None:
        async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as http:
            while time.perf_counter() < deadline:
                face_a, face_b = next(pairs)
                body = {"face_a": face_a, "face_b": face_b, "label": next(counter) % 2}
                started = time.perf_counter()
                try:
                    response = await http.post(path, json=body)
                except httpx.TransportError as exc:  # counted and named, not fatal: the run goes on
                    failures[type(exc).__name__] += 1
                    continue
                if response.status_code != 201:
                    failures[str(response.status_code)] += 1
                    continue
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else None
    return {
        "clients": clients,
        "requests": len(ordered),
        "errors": sum(failures.values()),
        "error_kinds": dict(failures),
        "requests_per_s": round(len(ordered) / elapsed, 1),
        "p50_ms": round(1000 * statistics.median(ordered), 2) if ordered else None,
        "p99_ms": round(1000 * p99, 2) if p99 is not None else None,
    }


def drive(
    base_url: str,
    path: str,
    headers: dict[str, str],
    pairs: Iterator[tuple[str, str]],
    clients: int,
    seconds: float,
) -> dict[str, Any]:
    """`clients` concurrent clients posting single pairs for `seconds`: throughput, p50/p99, errors."""
    return asyncio.run(_drive(base_url, path, headers, pairs, clients, seconds))
