"""Embedding throughput: embed_pixels beside a plain inference_mode forward of the same model; prints JSON.

Both embed the same images (the johns faces, repeated to fill `--images`) in batches of 64 with the same
thread count, alternating in rounds so that background load hits both alike. The plain side forwards inputs
preprocessed once up front and keeps the raw outputs; embed_pixels starts from uint8 pixels and also
preprocesses, normalises and returns the norms, so the ratio is the cost of that service around the network.

    python bench/embed_throughput.py [--arch mobilefacenet iresnet18] [--seconds 20] [--threads 2]

Target: embed_pixels ≥ 0.9× the plain forward's images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from rounds import alternate

from worker.ml.backbones import build_backbone
from worker.ml.embedding import embed_pixels
from worker.ml.pairs import index_pairs, read_pairs
from worker.ml.preprocessing import ImageCache, preprocess_spec_for, to_model_input

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("MAGTUNE_SHARED_DIR", REPO_ROOT.parent / "shared"))
TARGET_RATIO = 0.9
ROUNDS = 6
BATCH_SIZE = 64


def timed_passes(one_pass, seconds: float, images: int) -> dict[str, float]:
    """Repeats a whole pass over the images until `seconds` are spent (at least one pass)."""
    passes = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    while passes == 0 or time.perf_counter() - start < seconds:
        one_pass()
        passes += 1
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"images": passes * images, "seconds": elapsed, "cpu_seconds": cpu}


def bench_arch(arch: str, pixels: torch.Tensor, seconds: float) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_backbone(arch).eval()
    spec = preprocess_spec_for(arch)
    inputs = to_model_input(pixels, spec)

    def ours() -> None:
        embed_pixels(model, spec, pixels, batch_size=BATCH_SIZE)

    def plain() -> None:
        with torch.inference_mode():
            for chunk in inputs.split(BATCH_SIZE):
                model(chunk)

    ours(), plain()  # warm-up
    sides = {
        "ours": lambda: timed_passes(ours, seconds / ROUNDS, pixels.shape[0]),
        "plain": lambda: timed_passes(plain, seconds / ROUNDS, pixels.shape[0]),
    }
    return {"arch": arch, **alternate(arch, sides, unit="images", rounds=ROUNDS, target=TARGET_RATIO)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", default=["mobilefacenet", "iresnet18"])
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per side and architecture")
    parser.add_argument("--images", type=int, default=128, help="images per pass (the faces, repeated)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--pairs", type=Path, default=SHARED_DIR / "data" / "faces" / "johns" / "pairs.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    faces = index_pairs(read_pairs(args.pairs).pairs, ImageCache()).pixels
    pixels = faces.repeat((args.images + len(faces) - 1) // len(faces), 1, 1, 1)[: args.images].contiguous()
    report = {
        "benchmark": "embed_throughput",
        "threads": torch.get_num_threads(),
        "batch_size": BATCH_SIZE,
        "images_per_pass": pixels.shape[0],
        "target_ratio": TARGET_RATIO,
        "results": [bench_arch(arch, pixels, args.seconds) for arch in args.arch],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
