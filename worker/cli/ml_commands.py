"""The offline commands: fine-tune, evaluate, validate, split and embed straight from files.

They do what the original scripts did (finetune.py, evaluate.py, validate_finetuning.py, split_train_test.py)
without the service: pair files, image folders and checkpoints in; checkpoints, pair files, `.npz` files and a
report out. Each ``*_command(args) -> dict`` returns its result and raises on bad input; `output.guarded`
turns that into printed text or JSON and an exit code, and `magtune selftest` calls the same functions.
Library imports sit inside the functions so `magtune --help` stays instant."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.splits import DEFAULT_SPLIT_FRACTIONS, SPLIT_NAMES
from worker.cli import output
from worker.cli.offline import (
    IMAGE_SUFFIXES,
    SELECTIONS,
    TRAINING_OPTIONS,
    embed_command,
    evaluate_command,
    finetune_command,
    split_command,
    validate_command,
)
from worker.ml.backbones import ARCHITECTURES

if TYPE_CHECKING:
    pass


def register(subparsers: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json", action="store_true", help="print one JSON document on stdout, no progress bars"
    )
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--device", help="cpu, cuda or cuda:N (default: the GPU when there is one)")

    p = subparsers.add_parser(
        "finetune",
        parents=[common, model],
        help="fine-tune a checkpoint on same/different pairs",
        description="Fine-tune with the contrastive loss; the weights are chosen (--selection) and the "
        "threshold calibrated on --val-pairs. Writes best.pth, final.pth (MagFace layout, with lineage and "
        "hyper-parameters) and history.json into --output-dir.",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="the parent checkpoint")
    p.add_argument("--arch", choices=ARCHITECTURES, required=True)
    p.add_argument("--train-pairs", type=Path, required=True, help="pairs file to train on")
    p.add_argument("--val-pairs", type=Path, help="held-out pairs for model selection and the threshold")
    p.add_argument("--output-dir", type=Path, required=True)
    for name, (kind, default) in TRAINING_OPTIONS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=_finite(kind), help=f"default {default}")
    p.add_argument("--freeze-stem", action="store_true", help="keep the layers before the first stage fixed")
    p.add_argument(
        "--selection",
        choices=SELECTIONS,
        default="val",
        help="val: the best epoch on --val-pairs; interpolate: the parent moved --interpolation of the way "
        "to the last epoch (default val)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace best.pth/final.pth already in --output-dir"
    )
    _bind(p, finetune_command, output.render_finetune)

    p = subparsers.add_parser("evaluate", parents=[common, model], help="score a model on labelled pairs")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--arch", choices=ARCHITECTURES, help="default: from the checkpoint")
    p.add_argument("--pairs", type=Path, required=True)
    p.add_argument("--threshold", type=_finite(float), help="default: the threshold stored in the checkpoint")
    _bind(p, evaluate_command, output.render_evaluate)

    p = subparsers.add_parser(
        "validate", parents=[common, model], help="compare a fine-tuned model with its parent, per pairs file"
    )
    p.add_argument("--pretrained", type=Path, required=True)
    p.add_argument("--finetuned", type=Path, required=True)
    p.add_argument("--arch", choices=ARCHITECTURES, help="default: from each checkpoint")
    p.add_argument(
        "--pairs", type=Path, action="append", required=True, help="a pairs file to report (repeat for more)"
    )
    p.add_argument(
        "--calibration-pairs",
        type=Path,
        help="held-out pairs to calibrate both thresholds on (default: each checkpoint's stored threshold)",
    )
    _bind(p, validate_command, output.render_validate)

    p = subparsers.add_parser(
        "split", parents=[common], help="split a pairs file into train/val/test per image"
    )
    p.add_argument("--input", type=Path, required=True)
    for name in SPLIT_NAMES:
        p.add_argument(f"--{name}-output", type=Path, required=True)
    for name, default in DEFAULT_SPLIT_FRACTIONS.items():
        p.add_argument(f"--{name}-fraction", type=_finite(float), default=default, help=f"default {default}")
    _bind(p, split_command, output.render_split)

    p = subparsers.add_parser(
        "embed",
        parents=[common, model],
        help="embed every image under a folder into an .npz",
        description=f"Embeds every {'/'.join(IMAGE_SUFFIXES)} file under --images (recursively) and writes "
        "ids (paths relative to --images), L2-normalised embeddings and the raw norms. Undecodable files are "
        "skipped and listed (exit 0) unless --strict.",
    )
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--arch", choices=ARCHITECTURES, help="default: from the checkpoint")
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--strict", action="store_true", help="fail on the first undecodable file")
    _bind(p, embed_command, output.render_embed)

    p = subparsers.add_parser("selftest", parents=[common], help="a quick check of the whole pipeline")
    p.set_defaults(handler=_selftest)


def _bind(parser: argparse.ArgumentParser, command: Any, render: output.Renderer) -> None:
    """`handler` prints and maps errors to exit codes; `run` returns the result (for `magtune selftest`)."""
    parser.set_defaults(handler=output.guarded(command, render), run=command)


def _finite(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _selftest(args: argparse.Namespace) -> int:
    from worker.cli.selftest import run_selftest

    result = run_selftest(show_progress=output.bars_enabled(args.json))
    output.emit(result, as_json=args.json, render=output.render_selftest)
    return output.EXIT_OK if result["ok"] else output.EXIT_FAILED
