"""Throughput of POST /v1/feedback/batch on a throw-away PostgreSQL database; prints one JSON object.

    python bench/feedback_batch.py [--batch 10000] [--rounds 5] [--admin-url postgresql://root@127.0.0.1/postgres]

Each round posts a batch of new pairs through the whole api (TestClient, all middleware); a last round posts
the first batch again (all pairs existing). CPU seconds of the api process and of the database backend are
reported too: on a shared machine they say what the wall time would be on an idle one.
"""

import argparse
import hashlib
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from fastapi.testclient import TestClient

from app.config import Settings
from app.db import get_engine, session_scope
from app.main import create_app
from app.migrate import upgrade_database
from app.tables import Face


def backend_cpu_seconds(admin_url: str, database: str) -> float:
    """CPU time of the database's server processes, when the server runs on this machine."""
    with psycopg.connect(admin_url) as conn:
        pids = [
            pid for (pid,) in conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (database,))
        ]
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def run(admin_url: str, batch: int, rounds: int) -> dict[str, Any]:
    database = f"magtune_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    url = admin_url.replace("postgresql://", "postgresql+psycopg://", 1).rsplit("/", 1)[0] + f"/{database}"
    try:
        upgrade_database(url)
        needed = batch * rounds
        face_count = next(n for n in itertools.count(2) if n * (n - 1) // 2 >= needed)
        with session_scope(url) as session:
            faces = [
                Face(
                    sha256=hashlib.sha256(str(i).encode()).hexdigest(),
                    byte_size=1,
                    media_type="image/png",
                    width=112,
                    height=112,
                    channels=3,
                    split=random.choice(["train", "val", "test"]),
                )
                for i in range(face_count)
            ]
            session.add_all(faces)
        ids = [str(face.id) for face in faces]
        pairs = list(itertools.combinations(ids, 2))
        random.shuffle(pairs)
        bodies = [
            {
                "items": [
                    {"face_a": a, "face_b": b, "label": random.randint(0, 1)}
                    for a, b in pairs[k * batch : (k + 1) * batch]
                ]
            }
            for k in range(rounds)
        ]
        settings = Settings(database_url=url, broker_url="memory://", data_dir=Path(tempfile.mkdtemp()))
        measured = []
        with TestClient(create_app(settings, run_sweeper=False)) as client:
            for body in [*bodies, bodies[0]]:
                db_before, cpu_before, started = (
                    backend_cpu_seconds(admin_url, database),
                    time.process_time(),
                    time.perf_counter(),
                )
                response = client.post("/v1/feedback/batch", json=body)
                wall = time.perf_counter() - started
                cpu = time.process_time() - cpu_before + backend_cpu_seconds(admin_url, database) - db_before
                assert response.status_code == 200, response.text[:300]
                measured.append((wall, cpu, response.json()["created"]))
        new, repeat = measured[:-1], measured[-1]
        assert all(created == batch for _, _, created in new) and repeat[2] == 0
        return {
            "database": "postgresql",
            "batch": batch,
            "rounds": rounds,
            "new_pairs_per_s_median": round(batch / statistics.median(wall for wall, _, _ in new)),
            "new_pairs_per_s_best": round(batch / min(wall for wall, _, _ in new)),
            "new_pairs_per_cpu_s_median": round(batch / statistics.median(cpu for _, cpu, _ in new)),
            "existing_pairs_per_s": round(batch / repeat[0]),
            "load_average": [round(load, 2) for load in os.getloadavg()],
            "cpu_count": os.cpu_count(),
        }
    finally:
        get_engine(url).dispose()
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("MAGTUNE_TEST_POSTGRES", "postgresql://root@127.0.0.1:5432/postgres"),
    )
    args = parser.parse_args()
    print(json.dumps(run(args.admin_url, args.batch, args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
