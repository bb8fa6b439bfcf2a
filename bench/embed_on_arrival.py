"""Embedding on arrival: faces uploaded at a steady rate, timed until the active model's embedding exists.

The service runs as `magtune up` lays it out, as real processes (`magtune serve`, `magtune worker` for the gpu
queue and `magtune worker --queue embed`), on a fresh PostgreSQL database and Redis. The MobileFaceNet
checkpoint is registered and activated, then faces (the johns and CMU aligned crops, cycled; each upload's PNG
carries a text chunk with its number, so its bytes, and so its face, are new while its pixels are not) are
uploaded at `--rate` per second for `--seconds`. A poller reads the new embedding rows by generation
(`generation > g`) every 0.1 s and stamps when each face's embedding became visible.

Reported: per-face latency from the upload's response to its embedding being visible (p50, p99, max), the
backlog (faces uploaded and not yet embedded) over time and its maximum, and the embed worker's steady-state
throughput: faces embedded per second over the seconds that start with at least a second's arrivals waiting
(the worker is saturated all through them), from the first embedding on (before it, the child imports torch
and loads the model), against a bare `inference_mode` forward of the same checkpoint in batches of 64
(bench/embed_throughput.py's plain side, with one thread and with torch's default, the faster one counting)
measured in the same run before the service starts. Every figure carries the load average.

    python bench/embed_on_arrival.py [--rate 20] [--seconds 60] [--bare-seconds 10]

Targets: p50 ≤ 10 s, throughput ≥ 0.8× the bare forward.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from processes import (
    REDIS_URL,
    free_port,
    fresh_database,
    libpq_url,
    load_averages,
    magtune,
    print_report,
    server,
    service_env,
    uptime,
    wait_job,
    worker,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("MAGTUNE_SHARED_DIR", REPO_ROOT.parent / "shared"))
CHECKPOINT = SHARED_DIR / "models" / "mobilefacenet" / "mobilefacenet.pt"
FACE_DIRS = ("data/faces/johns/aligned_112", "data/faces/cmu/aligned_112")
TARGET_P50_S = 10.0
TARGET_RATIO = 0.8
POLL_S = 0.1
BARE_BATCH = 64


def load() -> dict[str, Any]:
    """The load average now, and `uptime` as it prints it."""
    one, five, fifteen = load_averages()
    return {"load_1m": one, "load_5m": five, "load_15m": fifteen, "uptime": uptime()}


def face_files() -> list[Path]:
    files = [path for folder in FACE_DIRS for path in sorted((SHARED_DIR / folder).glob("*/*.png"))]
    if not files:
        raise SystemExit(f"no aligned faces under {SHARED_DIR}")
    return files


def variants(files: list[Path], count: int) -> list[bytes]:
    """`count` PNGs cycling through the files, each re-encoded with its number in a text chunk."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    images = []
    for path in files:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    out = []
    for number in range(count):
        info = PngInfo()
        info.add_text("magtune-bench", str(number))
        buffer = io.BytesIO()
        images[number % len(images)].save(buffer, format="PNG", pnginfo=info, compress_level=1)
        out.append(buffer.getvalue())
    return out


# The bare forward, measured before the service starts so nothing else competes with it.


def bare_forward(seconds: float) -> dict[str, Any]:
    import torch

    from worker.ml.checkpoints import load_backbone
    from worker.ml.preprocessing import decode_image, preprocess_spec_for, to_model_input

    model = load_backbone(CHECKPOINT, "mobilefacenet").model.eval()
    spec = preprocess_spec_for("mobilefacenet")
    files = face_files()
    pixels = torch.stack([decode_image(p.read_bytes(), size=spec.size).pixels for p in files[:BARE_BATCH]])
    inputs = to_model_input(pixels, spec)
    figures: dict[str, Any] = {"batch": BARE_BATCH}
    default_threads = torch.get_num_threads()
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            model(inputs)  # warm-up
            images, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds / 2:
                model(inputs)
                images += BARE_BATCH
        elapsed = time.perf_counter() - started
        figures[f"threads_{threads}"] = {"images_per_s": round(images / elapsed, 1), **load()}
    torch.set_num_threads(default_threads)
    # The reference is the faster: the worker's thread setting must not be what makes it look good.
    figures["images_per_s"] = max(v["images_per_s"] for k, v in figures.items() if k.startswith("threads_"))
    return figures


# The service.


JOB_TIMEOUT_S = 300


def activate_model(client: Any) -> str:
    files = {"file": (CHECKPOINT.name, CHECKPOINT.read_bytes(), "application/octet-stream")}
    registered = client.post("/v1/models", files=files, data={"arch": "mobilefacenet"}).json()
    if wait_job(client, registered["validation_job_id"], timeout_s=JOB_TIMEOUT_S)["status"] != "succeeded":
        raise RuntimeError("the checkpoint did not validate")
    activation = client.post(f"/v1/models/{registered['id']}/activate", json={"reason": "bench"}).json()
    wait_job(client, activation["reindex_job_id"], timeout_s=JOB_TIMEOUT_S)
    return str(registered["id"])


class Poller(threading.Thread):
    """Reads new embedding rows of the model (by generation) and stamps when each face's became visible."""

    def __init__(self, database_url: str, model_id: str) -> None:
        super().__init__(daemon=True)
        self.url = libpq_url(database_url)
        self.model_id = model_id
        self.seen: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        import psycopg

        generation = -1
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stop.is_set():
                rows = conn.execute(
                    "SELECT face_id, generation FROM embeddings WHERE model_id = %s AND generation > %s",
                    (uuid.UUID(self.model_id), generation),
                ).fetchall()
                now = time.monotonic()
                for face_id, row_generation in rows:
                    self.seen.setdefault(str(face_id), now)
                    generation = max(generation, row_generation)
                self.stop.wait(POLL_S)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def drive(client: Any, poller: Poller, faces: list[bytes], rate: float) -> tuple[dict[str, float], list[Any]]:
    """Upload the faces at `rate`, each at its scheduled time; the response time of each face id."""
    answered: dict[str, float] = {}
    backlog: list[Any] = []
    lock = threading.Lock()

    def upload(data: bytes) -> None:
        response = client.post("/v1/faces", files={"file": ("face.png", data, "image/png")})
        response.raise_for_status()
        with lock:
            answered[response.json()["id"]] = time.monotonic()

    started = time.monotonic()
    next_sample = started
    with ThreadPoolExecutor(max_workers=8) as pool:
        for number, data in enumerate(faces):
            due = started + number / rate
            while (now := time.monotonic()) < due:
                if now >= next_sample:
                    with lock:
                        waiting = sum(1 for face in answered if face not in poller.seen)
                    backlog.append([round(now - started, 1), waiting])
                    next_sample += 1.0
                time.sleep(min(0.01, due - now))
            pool.submit(upload, data)
    return answered, backlog


def busy_bins(answered: dict[str, float], seen: dict[str, float], backlog: int) -> tuple[int, int]:
    """(seconds, faces embedded in them) over the 1-second bins, from the first embedding on, that start with
    at least `backlog` faces waiting: the embed worker is saturated all through such a bin, so its faces per
    bin are its throughput, not the arrival rate. The time before the first embedding (the child importing
    torch and loading the model) is left out."""
    if not seen:
        return 0, 0
    start, end = min(seen.values()), max(seen.values())
    seconds = embedded = 0
    at = start
    while at + 1.0 <= end:
        waiting = sum(1 for face, t in answered.items() if t <= at and seen.get(face, float("inf")) > at)
        if waiting >= backlog:
            seconds += 1
            embedded += sum(1 for t in seen.values() if at <= t < at + 1.0)
        at += 1.0
    return seconds, embedded


def embed_jobs(database_url: str) -> list[tuple[float, int]]:
    """(running seconds, faces embedded) of every finished embed job, in the order they started."""
    import psycopg

    with psycopg.connect(libpq_url(database_url)) as conn:
        rows = conn.execute(
            "SELECT extract(epoch FROM finished_at - started_at), result FROM jobs "
            "WHERE kind = 'embed' AND status = 'succeeded' ORDER BY started_at"
        ).fetchall()
    return [(float(seconds), int(result["embedded"])) for seconds, result in rows]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    print("bare forward...", file=sys.stderr)
    bare = bare_forward(args.bare_seconds)
    print("encoding faces...", file=sys.stderr)
    faces = variants(face_files(), int(args.rate * args.seconds))
    with tempfile.TemporaryDirectory(prefix="magtune-bench-") as tmp, fresh_database() as database_url:
        env = service_env(database_url, tmp)
        port = free_port()
        api = magtune("serve", "--host", "127.0.0.1", "--port", str(port))
        embed_queue = env["MAGTUNE_EMBED_QUEUE_NAME"]
        with (
            server(api, env, f"http://127.0.0.1:{port}/readyz", Path(tmp) / "api.log"),
            worker(magtune("worker"), env, Path(tmp) / "gpu.log"),
            worker(magtune("worker", "--queue", embed_queue), env, Path(tmp) / "embed.log"),
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client,
        ):
            print("registering and activating the model...", file=sys.stderr)
            model_id = activate_model(client)
            poller = Poller(database_url, model_id)
            poller.start()
            print(f"uploading {len(faces)} faces at {args.rate}/s...", file=sys.stderr)
            before = load()
            answered, backlog = drive(client, poller, faces, args.rate)
            during = load()
            deadline = time.monotonic() + args.drain_seconds
            while time.monotonic() < deadline and any(face not in poller.seen for face in answered):
                time.sleep(1.0)
                waiting = sum(1 for face in answered if face not in poller.seen)
                backlog.append([round(backlog[-1][0] + 1.0, 1) if backlog else 0.0, waiting])
            poller.stop.set()
            poller.join()
            jobs = embed_jobs(database_url)
        _redis_cleanup(REDIS_URL, [env["MAGTUNE_QUEUE_NAME"], embed_queue])

    latencies = [poller.seen[face] - at for face, at in answered.items() if face in poller.seen]
    busy_seconds, embedded = busy_bins(answered, poller.seen, backlog=round(args.rate))
    throughput = embedded / busy_seconds if busy_seconds else 0.0
    ratio = throughput / bare["images_per_s"]
    p50 = statistics.median(latencies) if latencies else None
    return {
        "benchmark": "embed_on_arrival",
        "service": "magtune serve + magtune worker (gpu) + magtune worker --queue embed, PostgreSQL + Redis",
        "cpu_count": os.cpu_count(),
        "rate_per_s": args.rate,
        "seconds": args.seconds,
        "uploaded": len(answered),
        "embedded": len(latencies),
        "latency_s": {
            "p50": round(p50, 3) if p50 is not None else None,
            "p99": round(percentile(latencies, 0.99), 3) if latencies else None,
            "max": round(max(latencies), 3) if latencies else None,
            "target_p50": TARGET_P50_S,
            "meets_target": p50 is not None and p50 <= TARGET_P50_S,
        },
        "backlog": {"max": max((waiting for _, waiting in backlog), default=0), "per_second": backlog},
        "embed_worker": {
            "jobs": len(jobs),
            "faces_per_job": round(sum(n for _, n in jobs) / len(jobs), 1) if jobs else None,
            "job_running_seconds": round(sum(t for t, _ in jobs), 2),
            "first_embedding_after_s": round(min(poller.seen.values()) - min(answered.values()), 2)
            if poller.seen and answered
            else None,
            "busy_seconds": busy_seconds,
            "faces_per_busy_s": round(throughput, 1),
        },
        "bare_forward": bare,
        "throughput_ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        "load": {"before_uploads": before, "end_of_uploads": during, "end": load()},
    }


def _redis_cleanup(url: str, queues: list[str]) -> None:
    import redis

    client = redis.Redis.from_url(url)
    for name in queues:
        client.delete(name, f"_kombu.binding.{name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=20.0, help="uploads per second")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to upload")
    parser.add_argument("--bare-seconds", type=float, default=10.0, help="the bare forward's timed seconds")
    parser.add_argument("--drain-seconds", type=float, default=120.0, help="wait for the backlog at the end")
    print_report(run(parser.parse_args()))


if __name__ == "__main__":
    main()
