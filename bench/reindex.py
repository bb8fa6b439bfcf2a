"""Reindex throughput end to end: faces/s of a reindex job run by one and by two `magtune worker` processes
against a bare `inference_mode` forward over decoded faces, in the same run.

The job does every step: read each face from the blob store, decode, forward, write the embeddings to
PostgreSQL (one multi-row INSERT ... ON CONFLICT DO NOTHING per batch). Faces/s is the number of faces over
the job's started_at → finished_at, which includes loading the model and, with more faces missing than
MAGTUNE_REINDEX_CHUNK_SIZE, planning the chunks that the workers share. Each worker process runs torch on one
thread (OMP_NUM_THREADS=1), and so does the bare forward: the one-worker ratio compares like with like, and
two workers can use two cores.

    python bench/reindex.py                       # 20,000 faces, chunks of 2,048
    python bench/reindex.py --faces 300 --chunk-size 64   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from embed_on_arrival import CHECKPOINT, face_files, load, variants
from processes import REDIS_URL, fresh_database, magtune, migrated_env, print_report, worker

TARGET_RATIO = 0.8
BATCH = 64


def seed(settings: Any, count: int) -> tuple[uuid.UUID, list[tuple[uuid.UUID, str]]]:
    """`count` distinct faces in the blob store and the database, and MobileFaceNet as a ready model."""
    from sqlalchemy import insert

    from app.db import session_scope
    from app.splits import split_for_digest
    from app.tables import Face, ModelVersion
    from worker.jobs.registry import blob_store
    from worker.ml.preprocessing import preprocess_spec_for

    store = blob_store(settings)
    rows = []
    for data in variants(face_files(), count):
        blob = store.write_stream("faces", [data])
        rows.append(
            {
                "id": uuid.uuid4(),
                "sha256": blob.sha256,
                "byte_size": blob.size,
                "media_type": "image/png",
                "width": 112,
                "height": 112,
                "channels": 3,
                "split": split_for_digest(blob.sha256, settings.split_fractions),
            }
        )
    checkpoint = store.write_stream("checkpoints", [CHECKPOINT.read_bytes()])
    with session_scope(settings.database_url) as session:
        session.execute(insert(Face), rows)
        model = ModelVersion(
            name="bench",
            arch="mobilefacenet",
            status="ready",
            sha256=checkpoint.sha256,
            byte_size=checkpoint.size,
            embedding_size=128,
            preprocess=preprocess_spec_for("mobilefacenet").to_dict(),
        )
        session.add(model)
        session.flush()
        return model.id, [(row["id"], row["sha256"]) for row in rows]


def bare_forward(settings: Any, faces: list[tuple[uuid.UUID, str]], seconds: float) -> dict[str, Any]:
    """A plain forward at one thread over faces decoded from the same blobs (a sample of up to 1,024)."""
    import torch

    from worker.jobs.data import decode_face
    from worker.jobs.registry import blob_store
    from worker.ml.checkpoints import load_backbone
    from worker.ml.preprocessing import preprocess_spec_for, to_model_input

    torch.set_num_threads(1)
    model = load_backbone(CHECKPOINT, "mobilefacenet").model.eval()
    spec = preprocess_spec_for("mobilefacenet")
    store = blob_store(settings)
    pixels = torch.stack([decode_face(store, i, sha, spec.size) for i, sha in faces[:1024]])
    batches = [to_model_input(pixels[i : i + BATCH], spec) for i in range(0, len(pixels), BATCH)]
    with torch.inference_mode():
        model(batches[0])  # warm-up
        images, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            for batch in batches:
                model(batch)
                images += len(batch)
    return {"faces_per_s": round(images / (time.perf_counter() - started), 1), "threads": 1, **load()}


def reindex(settings: Any, model_id: uuid.UUID, timeout_s: float) -> dict[str, Any]:
    """Queue a reindex, wait for it, and clear the model's embeddings for the next run."""
    from sqlalchemy import delete, select

    from app.db import session_scope
    from app.domain import JobKind
    from app.jobs.params import ReindexParams
    from app.jobs.submission import add_job
    from app.tables import EmbeddingGeneration, FaceEmbedding, Job, JobChunk

    with session_scope(settings.database_url) as session:
        job_id = add_job(
            session=session, settings=settings, kind=JobKind.REINDEX, params=ReindexParams(model=model_id)
        ).id
    deadline = time.monotonic() + timeout_s
    while True:
        with session_scope(settings.database_url) as session:
            job = session.get(Job, job_id)
            assert job is not None
            if job.status in ("succeeded", "failed", "cancelled"):
                status, started, finished, result = job.status, job.started_at, job.finished_at, job.result
                takers = set(session.scalars(select(JobChunk.worker).where(JobChunk.job_id == job_id)))
                break
        if time.monotonic() > deadline:
            raise SystemExit(f"reindex {job_id} did not finish in {timeout_s:.0f} s")
        time.sleep(0.5)
    with session_scope(settings.database_url) as session:
        session.execute(delete(FaceEmbedding).where(FaceEmbedding.model_id == model_id))
        session.execute(delete(EmbeddingGeneration).where(EmbeddingGeneration.model_id == model_id))
    seconds = (finished - started).total_seconds()
    embedded = int((result or {}).get("embedded", 0))
    return {
        "status": status,
        "embedded": embedded,
        "chunks": (result or {}).get("chunks", 0),
        "workers_that_took_chunks": len({w.split(":")[0] for w in takers if w}),
        "seconds": round(seconds, 2),
        "faces_per_s": round(embedded / seconds, 1) if seconds else None,
        **load(),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from app.config import Settings

    queue = f"bench-reindex-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp, fresh_database() as database_url:
        env = migrated_env(
            database_url,
            tmp,
            MAGTUNE_QUEUE_NAME=queue,
            MAGTUNE_REINDEX_CHUNK_SIZE=str(args.chunk_size),
            MAGTUNE_REINDEX_BATCH_SIZE=str(BATCH),
        )
        env["OMP_NUM_THREADS"] = "1"
        settings = Settings(
            database_url=database_url,
            broker_url=REDIS_URL,
            queue_name=queue,
            data_dir=Path(tmp) / "data",
            reindex_chunk_size=args.chunk_size,
        )
        print(f"seeding {args.faces} faces", file=sys.stderr)
        model_id, faces = seed(settings, args.faces)
        print("bare forward", file=sys.stderr)
        bare = bare_forward(settings, faces, args.seconds)
        print(f"bare forward: {json.dumps(bare)}", file=sys.stderr)  # kept if a long run is stopped later
        report: dict[str, Any] = {
            "faces": args.faces,
            "chunk_size": args.chunk_size,
            "batch": BATCH,
            "bare": bare,
        }
        with ExitStack() as stack:
            for count in (1, 2):
                name = f"w{count}"
                stack.enter_context(
                    worker(magtune("worker", "--name", f"{name}@%h"), env, Path(tmp) / f"{name}.log")
                )
                print(f"reindex with {count} worker(s)", file=sys.stderr)
                report[f"workers_{count}"] = reindex(settings, model_id, args.timeout)
                print(f"{count} worker(s): {json.dumps(report[f'workers_{count}'])}", file=sys.stderr)
        one = report["workers_1"]["faces_per_s"] or 0.0
        two = report["workers_2"]["faces_per_s"] or 0.0
        report["ratio_one_worker_to_bare"] = round(one / bare["faces_per_s"], 3)
        report["speedup_two_workers"] = round(two / one, 3) if one else None
        report["target_ratio"] = TARGET_RATIO
        report["cores"] = os.cpu_count()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=20_000)
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--seconds", type=float, default=20.0, help="how long the bare forward runs")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds each reindex may take")
    print_report(run(parser.parse_args()))


if __name__ == "__main__":
    main()
