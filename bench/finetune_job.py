"""A fine-tune job end to end, phase by phase, beside the trainer alone on the same pairs; prints JSON.

The service runs as real processes (`magtune serve` and one `magtune worker`) on a fresh PostgreSQL database
and Redis. The johns pairs go in through the api (`magtune import`), which splits their faces into train, val
and test; the shared MobileFaceNet is registered (not activated, so no reindex or embed job shares the
worker), and one fine-tune job is queued through `POST /v1/jobs` and followed with `GET /v1/jobs/{id}`. Its
`result.phases` gives the seconds of loading, training, saving, evaluating and gating, and the training
phase's pairs/s (the pairs of every epoch run, over the whole phase: the distillation pass, validation after
every epoch and the trainer state saved at every epoch end included).

The reference is bench/train_throughput.py's own trainer (`ours`: `worker.ml.training.finetune` with its
default config, no val) on exactly the pairs the job trains on (its train split, read back from the
database and decoded as the job decodes them), from the same checkpoint, at the same batch size and thread
count (the worker gets OMP_NUM_THREADS), measured in this process before and after the job so that a change
of load during the run shows.

    python bench/finetune_job.py [--epochs 10] [--threads 2] [--trainer-seconds 20]

Target: the training phase ≥ 0.8× the trainer's pairs/s (`training_phase_ratio`, wall clock). Beside it,
`training_phase_cpu_ratio` compares pairs per CPU second, which load from other processes changes less.
"""

from __future__ import annotations

import argparse
import copy
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from embed_on_arrival import CHECKPOINT, SHARED_DIR, load
from processes import (
    REDIS_URL,
    api_key,
    free_port,
    fresh_database,
    magtune,
    print_report,
    server,
    service_env,
    wait_job,
    worker,
)
from train_throughput import BATCH_SIZE, ours

TARGET_RATIO = 0.8
PAIRS_FILE = SHARED_DIR / "data" / "faces" / "johns" / "pairs.json"
SCOPES = "faces:write,feedback:write,jobs:read,jobs:write,models:read,models:write"
JOB_TIMEOUT_S = 1800


def register_model(client: Any) -> str:
    files = {"file": (CHECKPOINT.name, CHECKPOINT.read_bytes(), "application/octet-stream")}
    registered = client.post("/v1/models", files=files, data={"arch": "mobilefacenet"}).json()
    if wait_job(client, registered["validation_job_id"], timeout_s=300)["status"] != "succeeded":
        raise RuntimeError("the checkpoint did not validate")
    return str(registered["id"])


def train_pairs(settings: Any) -> Any:
    """The pairs a fine-tune job would train on now: the train split, decoded as the job decodes it."""
    from app.db import session_scope
    from worker.jobs.data import decode_faces, face_digests, indexed_pairs, load_feedback
    from worker.jobs.registry import blob_store

    with session_scope(settings.database_url) as session:
        sets = load_feedback(session)
        digests = face_digests(session)
    pixels = decode_faces(blob_store(settings), digests, sets.faces("train"), size=112)
    return indexed_pairs(sets.pairs["train"], pixels)


def trainer(pairs: Any, seconds: float) -> dict[str, Any]:
    """bench/train_throughput.py's `ours` from the shared checkpoint, after a one-step warm-up."""
    from worker.ml.checkpoints import load_backbone
    from worker.ml.preprocessing import preprocess_spec_for

    base = load_backbone(CHECKPOINT, "mobilefacenet").model.eval()
    spec = preprocess_spec_for("mobilefacenet")
    ours(copy.deepcopy(base), spec, pairs, 0, 1)
    measured = ours(copy.deepcopy(base), spec, pairs, seconds, 3)
    rate = measured["pairs"] / measured["seconds"]
    return {**{k: round(v, 2) for k, v in measured.items()}, "pairs_per_s": round(rate, 2), **load()}


def run_job(client: Any, model_id: str, epochs: int) -> dict[str, Any]:
    params = {"base_model": model_id, "epochs": epochs, "auto_promote": False}
    submitted = client.post("/v1/jobs", json={"kind": "finetune", "params": params})
    submitted.raise_for_status()
    job = wait_job(client, submitted.json()["id"], timeout_s=JOB_TIMEOUT_S, poll_s=0.5)
    if job["status"] != "succeeded":
        raise RuntimeError(f"the fine-tune ended {job['status']}: {job['error']}")
    return job


def seconds_between(start: str, end: str) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def job_figures(job: dict[str, Any]) -> dict[str, Any]:
    result = job["result"]
    phases = result["phases"]
    wall = seconds_between(job["started_at"], job["finished_at"])
    return {
        "id": job["id"],
        "params": job["params"],
        "epochs_run": result["epochs_run"],
        "stopped_early": result["stopped_early"],
        "pairs": result["dataset_snapshot"]["pairs"],
        "phases": phases,
        "queued_s": round(seconds_between(job["created_at"], job["started_at"]), 2),
        "started_to_finished_s": round(wall, 2),
        "outside_phases_s": round(wall - sum(phase["seconds"] for phase in phases.values()), 2),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    import torch

    from app.config import Settings

    torch.set_num_threads(args.threads)
    started = load()
    with tempfile.TemporaryDirectory(prefix="magtune-bench-") as tmp, fresh_database() as database_url:
        env = service_env(database_url, tmp, OMP_NUM_THREADS=str(args.threads))
        settings = Settings(database_url=database_url, broker_url=REDIS_URL, data_dir=Path(tmp) / "data")
        key = api_key(env, SCOPES, name="finetune bench")
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        api = magtune("serve", "--host", "127.0.0.1", "--port", str(port))
        with (
            server(api, env, f"{base}/readyz", Path(tmp) / "api.log"),
            worker(magtune("worker"), env, Path(tmp) / "worker.log") as gpu_worker,
            httpx.Client(base_url=base, timeout=60, headers={"Authorization": f"Bearer {key}"}) as client,
        ):
            print("registering the model, importing the johns pairs...", file=sys.stderr)
            model_id = register_model(client)
            subprocess.run(
                magtune("import", str(PAIRS_FILE), "--api", base),
                env={**env, "MAGTUNE_API_KEY": key},
                check=True,
                capture_output=True,
            )
            pairs = train_pairs(settings)
            print(f"trainer on the {len(pairs)} train pairs...", file=sys.stderr)
            before = trainer(pairs, args.trainer_seconds)
            print(f"fine-tune job ({args.epochs} epochs)...", file=sys.stderr)
            profile = py_spy(gpu_worker.pid, args.py_spy) if args.py_spy else None
            job = job_figures(run_job(client, model_id, args.epochs))
            if profile is not None:
                profile.send_signal(signal.SIGINT)  # py-spy writes its file on an interrupt
                profile.wait(timeout=120)
            after_job = load()
            print("trainer again...", file=sys.stderr)
            after = trainer(pairs, args.trainer_seconds)
    reference = (before["pairs_per_s"] + after["pairs_per_s"]) / 2
    reference_cpu = (before["pairs"] + after["pairs"]) / (before["cpu_seconds"] + after["cpu_seconds"])
    training = job["phases"]["training"]
    ratio = training["pairs_per_s"] / reference
    cpu_ratio = training["pairs"] / training["cpu_seconds"] / reference_cpu
    return {
        "benchmark": "finetune_job",
        "service": "magtune serve + magtune worker, PostgreSQL + Redis",
        "arch": "mobilefacenet",
        "batch_size": BATCH_SIZE,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "train_pairs": len(pairs),
        "train_images": pairs.image_count,
        "job": job,
        "trainer": {
            "before_job": before,
            "after_job": after,
            "pairs_per_s": round(reference, 2),
            "pairs_per_cpu_s": round(reference_cpu, 2),
        },
        "training_phase_ratio": round(ratio, 3),
        "training_phase_cpu_ratio": round(cpu_ratio, 3),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        "load": {"start": started, "after_job": after_job, "end": load()},
    }


def py_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling the worker and its job's child process (raw collapsed stacks) until interrupted."""
    command = ["py-spy", "record", "-f", "raw", "--subprocesses", "-p", str(pid), "-o", str(out)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10, help="the job's epochs (patience stays at 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, the bench's and the worker's")
    parser.add_argument("--trainer-seconds", type=float, default=20.0, help="each trainer measurement")
    parser.add_argument("--py-spy", type=Path, help="record the worker with py-spy into this file")
    print_report(run(parser.parse_args()))


if __name__ == "__main__":
    main()
