"""Fine-tuning throughput: our trainer beside a plain PyTorch loop on the same pairs; prints JSON.

Ours is `worker.ml.training.finetune` itself with its default config: batches arranged around few images,
each distinct image of a batch forwarded once, and the distillation term (one embedding pass when a run
starts). The plain loop is what a per-pair data loader gives: shuffled batches, both images of every pair
forwarded (as one batch of 2×16, from inputs preprocessed once up front). Both train every layer of the same
freshly built model (BatchNorm in eval mode, Adam, lr 1e-4, 16 pairs a batch) on the johns pairs, with the
same thread count, alternating in rounds so that background load hits both alike.

    python bench/train_throughput.py [--arch mobilefacenet iresnet18] [--seconds 20] [--threads 2]

Target: ours ≥ 3× the plain loop's pairs/s on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from rounds import alternate

from worker.ml.backbones import build_backbone
from worker.ml.loss import contrastive_loss
from worker.ml.pairs import IndexedPairs, index_pairs, read_pairs
from worker.ml.preprocessing import ImageCache, PreprocessSpec, preprocess_spec_for, to_model_input
from worker.ml.training import TrainConfig, TrainingCancelled, TrainProgress, finetune

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("MAGTUNE_SHARED_DIR", REPO_ROOT.parent / "shared"))
TARGET_RATIO = 3.0
ROUNDS = 4
BATCH_SIZE = 16


def ours(
    model: torch.nn.Module, spec: PreprocessSpec, pairs: IndexedPairs, seconds: float, min_steps: int
) -> dict:
    """Runs finetune until the time is up (cancelled between steps) and counts the pairs its steps scored."""
    config = TrainConfig(epochs=1000, batch_size=BATCH_SIZE)  # the defaults: every layer trains
    done = {"pairs": 0, "steps": 0, "end": 0.0, "cpu_end": 0.0}

    def on_progress(update: TrainProgress) -> None:
        if update.phase == "train":
            done["pairs"] = (update.epoch - 1) * len(pairs) + min(update.step * BATCH_SIZE, len(pairs))
            done["steps"] += 1
            done["end"], done["cpu_end"] = time.perf_counter(), time.process_time()

    start, cpu_start = time.perf_counter(), time.process_time()

    def out_of_time() -> bool:
        return done["steps"] >= min_steps and time.perf_counter() - start >= seconds

    with contextlib.suppress(TrainingCancelled):
        finetune(
            model,
            spec,
            pairs,
            None,
            config,
            progress=on_progress,
            should_cancel=out_of_time,
            device="cpu",
            progress_interval=0,
        )
    return {
        "pairs": done["pairs"],
        "steps": done["steps"],
        "seconds": done["end"] - start,
        "cpu_seconds": done["cpu_end"] - cpu_start,
    }


def plain(
    model: torch.nn.Module, spec: PreprocessSpec, pairs: IndexedPairs, seconds: float, min_steps: int
) -> dict:
    """The per-pair loop: shuffled batches, both images of each pair forwarded, same loss and optimizer."""
    model.eval()
    inputs = to_model_input(pairs.pixels, spec)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    count, steps = 0, 0
    start, cpu_start = time.perf_counter(), time.process_time()
    while steps < min_steps or time.perf_counter() - start < seconds:
        for batch in torch.randperm(len(pairs), generator=generator).split(BATCH_SIZE):
            first, second = pairs.first[batch], pairs.second[batch]
            embeddings = model(torch.cat([inputs[first], inputs[second]]))
            loss = contrastive_loss(
                embeddings[: len(batch)], embeddings[len(batch) :], pairs.labels[batch], 1.4
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            count, steps = count + len(batch), steps + 1
            if steps >= min_steps and time.perf_counter() - start >= seconds:
                break
    return {
        "pairs": count,
        "steps": steps,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
    }


def bench_arch(arch: str, pairs: IndexedPairs, seconds: float, min_steps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    base = build_backbone(arch).eval()
    spec = preprocess_spec_for(arch)
    ours(copy.deepcopy(base), spec, pairs, 0, 1)  # warm-up: allocator and kernel choices
    plain(copy.deepcopy(base), spec, pairs, 0, 1)
    sides = {
        name: lambda run=run: run(copy.deepcopy(base), spec, pairs, seconds / ROUNDS, min_steps)
        for name, run in (("ours", ours), ("plain", plain))
    }
    return {"arch": arch, **alternate(arch, sides, unit="pairs", rounds=ROUNDS, target=TARGET_RATIO)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", default=["mobilefacenet", "iresnet18"])
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per side and architecture")
    parser.add_argument(
        "--min-steps", type=int, default=3, help="at least this many steps per side and round"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--pairs", type=Path, default=SHARED_DIR / "data" / "faces" / "johns" / "pairs.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pairs = index_pairs(read_pairs(args.pairs).pairs, ImageCache())
    results = [bench_arch(arch, pairs, args.seconds, args.min_steps) for arch in args.arch]
    report = {
        "benchmark": "train_throughput",
        "threads": torch.get_num_threads(),
        "batch_size": BATCH_SIZE,
        "pairs": len(pairs),
        "images": pairs.image_count,
        "target_ratio": TARGET_RATIO,
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
