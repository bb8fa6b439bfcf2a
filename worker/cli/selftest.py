"""`magtune selftest`: the whole offline pipeline on generated data, in a temporary folder.

It needs nothing but the installed package (no shared data, no database, no network), so it answers "does this
installation work?" on a fresh machine or in a container in well under a minute on a CPU. The fine-tune,
evaluate, validate, split and embed checks run the real commands through their argument parser, so they cover
what users run, not a parallel code path.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from app.domain import Architecture
from worker.cli import output

PEOPLE = 3
IMAGES_PER_PERSON = 4
TRAIN_IMAGES_PER_PERSON = 2  # the rest are held out for val: one training step, then two validations


class _Skipped(Exception):
    """A check that could not run because an earlier one failed."""


@dataclass
class _Workspace:
    """What the checks share: a temporary folder and what earlier checks produced in it."""

    root: Path
    parser: argparse.ArgumentParser
    models: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)

    def need(self, name: str) -> Path:
        if name not in self.files:
            raise _Skipped(f"skipped: needs {name}, which an earlier check did not produce")
        return self.files[name]

    def run(self, *argv: str | Path) -> dict[str, Any]:
        """A command's result, run exactly as `magtune ARGV --json` would run it (its warnings silenced)."""
        args = self.parser.parse_args([str(a) for a in (*argv, "--json")])
        with contextlib.redirect_stderr(io.StringIO()):
            return args.run(args)


def run_selftest(*, show_progress: bool = False) -> dict[str, Any]:
    checks: list[tuple[str, Callable[[_Workspace], str]]] = [
        ("faces", _write_faces),
        ("backbones", _check_backbones),
        ("checkpoint", _check_checkpoint),
        ("decode", _check_decode),
        ("split", _check_split),
        ("finetune", _check_finetune),
        ("evaluate", _check_evaluate),
        ("validate", _check_validate),
        ("embed", _check_embed),
    ]
    import torch

    started = time.perf_counter()
    results = []
    with torch.random.fork_rng(), tempfile.TemporaryDirectory(prefix="magtune-selftest-") as folder:
        torch.manual_seed(0)  # the same random networks every run, without touching the caller's generator
        workspace = _Workspace(Path(folder), _parser())
        for name, check in output.progress(checks, total=len(checks), desc="selftest", enabled=show_progress):
            begun = time.perf_counter()
            try:
                detail, ok = check(workspace), True
            except _Skipped as exc:
                detail, ok = str(exc), False
            except Exception as exc:  # a selftest reports every failure and goes on
                detail, ok = f"{type(exc).__name__}: {' '.join(str(exc).split())}", False
            results.append({"name": name, "ok": ok, "seconds": time.perf_counter() - begun, "detail": detail})
    return {
        "ok": all(r["ok"] for r in results),
        "seconds": time.perf_counter() - started,
        "checks": results,
    }


def _parser() -> argparse.ArgumentParser:
    from worker.cli import ml_commands

    parser = argparse.ArgumentParser(prog="magtune")
    ml_commands.register(parser.add_subparsers(dest="command", required=True))
    return parser


def _write_faces(workspace: _Workspace) -> str:
    """Generated "people": each a smooth colour pattern of its own, each image of it shifted and noisy."""
    import numpy as np
    from PIL import Image

    from worker.ml.pair_file import LabeledPair, write_pairs

    rng = np.random.default_rng(0)
    faces = workspace.root / "faces"
    images: dict[int, list[Path]] = {}
    for person in range(PEOPLE):
        pattern = np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((16, 16, 1)))
        folder = faces / f"person_{person}"
        folder.mkdir(parents=True)
        for index in range(IMAGES_PER_PERSON):
            shifted = np.roll(pattern, rng.integers(-6, 7, 2), axis=(0, 1))[8:120, 8:120]
            pixels = np.clip(shifted + rng.normal(0, 12, shifted.shape), 0, 255).astype(np.uint8)
            path = folder / f"{index}.png"
            Image.fromarray(pixels).save(path)
            images.setdefault(person, []).append(path)
    for name, chosen in (
        ("train", slice(0, TRAIN_IMAGES_PER_PERSON)),
        ("val", slice(TRAIN_IMAGES_PER_PERSON, None)),
        ("all", slice(None)),
    ):
        paths = [(person, path) for person, own in images.items() for path in own[chosen]]
        pairs = [LabeledPair(a, b, int(p == q)) for (p, a), (q, b) in combinations(paths, 2)]
        workspace.files[f"{name} pairs"] = workspace.root / f"{name}.json"
        write_pairs(workspace.files[f"{name} pairs"], pairs)
    workspace.files["faces"] = faces
    return f"{PEOPLE} people × {IMAGES_PER_PERSON} images generated, train/val/all pair files written"


def _check_backbones(workspace: _Workspace) -> str:
    import torch

    from worker.ml.backbones import ARCHITECTURES, build_backbone, embedding_size

    sizes = []
    for arch in ARCHITECTURES:
        model = build_backbone(arch).eval()
        with torch.no_grad():
            embedding = model(torch.rand(1, 3, 112, 112))
        expected = (1, embedding_size(arch))
        if tuple(embedding.shape) != expected or not torch.isfinite(embedding).all():
            raise AssertionError(f"{arch} gave {tuple(embedding.shape)}, expected {expected}")
        sizes.append(f"{arch} {embedding.shape[1]}-d")
        if arch in (Architecture.IRESNET18, Architecture.MOBILEFACENET):
            workspace.models[arch] = model
    return ", ".join(sizes)


def _check_checkpoint(workspace: _Workspace) -> str:
    import torch

    from app.durable import file_digest
    from worker.ml.checkpoints import CheckpointError, load_backbone, save_checkpoint

    for arch in (Architecture.IRESNET18.value, Architecture.MOBILEFACENET.value):
        model = workspace.models.get(arch)
        if model is None:
            raise _Skipped(f"skipped: the backbones check did not build {arch}")
        if arch == Architecture.MOBILEFACENET:
            _settle_batch_norm(model, workspace.need("faces"))
        path = workspace.root / f"{arch}.pth"
        sha256 = save_checkpoint(path, model, arch=arch, epoch=0, metadata={"selftest": True})
        loaded = load_backbone(path)
        if loaded.arch != arch or loaded.sha256 != sha256 or sha256 != file_digest(path):
            raise AssertionError(f"{arch} read back as {loaded.arch} with sha256 {loaded.sha256[:12]}")
        original = model.state_dict()
        if any(not torch.equal(value, original[key]) for key, value in loaded.model.state_dict().items()):
            raise AssertionError(f"{arch} tensors changed on the way through the file")
        if not loaded.metadata.get("selftest"):
            raise AssertionError(f"{arch} metadata lost: {loaded.metadata}")
    workspace.files["parent"] = workspace.root / "mobilefacenet.pth"
    try:
        load_backbone(workspace.files["parent"], Architecture.IRESNET50)
    except CheckpointError as exc:
        if exc.suggested_arch != Architecture.MOBILEFACENET:
            raise AssertionError(f"a wrong-architecture load did not point at mobilefacenet: {exc}") from exc
    else:
        raise AssertionError("a MobileFaceNet checkpoint loaded as iresnet50")
    return "iresnet18 and mobilefacenet written, read back identical, wrong architecture refused"


def _settle_batch_norm(model: Any, faces: Path) -> None:
    """Give a freshly initialised network BatchNorm statistics of the generated faces.

    With initial statistics (mean 0, variance 1) a random network maps every face to nearly the same
    direction (cosines ≈ 0.9), and a threshold calibrated on that is meaningless; with statistics of its
    input, cosines spread around 0 like a trained model's, so the fine-tune check calibrates a real threshold.
    """
    import torch

    from worker.ml.preprocessing import decode_image, preprocess_spec_for, to_model_input

    pixels = torch.stack([decode_image(path).pixels for path in sorted(faces.rglob("*.png"))])
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: one batch sets the statistics
    model.train()
    with torch.no_grad():
        model(to_model_input(pixels, preprocess_spec_for(Architecture.MOBILEFACENET)))
    model.eval()
    for norm in norms:
        norm.momentum = 0.1


def _check_decode(workspace: _Workspace) -> str:
    from PIL import Image

    from worker.ml.preprocessing import ImageDecodeError, decode_image

    cases = {
        "112×112 RGB PNG": (Image.new("RGB", (112, 112), (200, 30, 40)), "PNG", False),
        "150×150 greyscale JPEG": (Image.new("L", (150, 150), 128), "JPEG", True),
        "RGBA PNG": (Image.new("RGBA", (112, 112), (10, 20, 30, 0)), "PNG", False),
    }
    for label, (image, fmt, resized) in cases.items():
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        decoded = decode_image(buffer.getvalue(), name=label)
        if tuple(decoded.pixels.shape) != (3, 112, 112) or decoded.resized != resized:
            raise AssertionError(
                f"{label} decoded to {tuple(decoded.pixels.shape)}, resized={decoded.resized}"
            )
    buffer = io.BytesIO()
    cases["112×112 RGB PNG"][0].save(buffer, "PNG")
    try:
        decode_image(buffer.getvalue()[:60], name="truncated.png")
    except ImageDecodeError:
        pass
    else:
        raise AssertionError("a truncated PNG decoded without error")
    return f"{', '.join(cases)} decoded; a truncated PNG refused"


def _check_split(workspace: _Workspace) -> str:
    from worker.ml.pair_file import read_pairs

    outputs = {name: workspace.root / "split" / f"{name}.json" for name in ("train", "val", "test")}
    result = workspace.run(
        "split",
        "--input",
        workspace.need("all pairs"),
        *(item for name, path in outputs.items() for item in (f"--{name}-output", path)),
    )
    owners: dict[Path, str] = {}
    for name, path in outputs.items():
        for pair in read_pairs(path).pairs:
            for image in (pair.image1, pair.image2):
                if owners.setdefault(image, name) != name:
                    raise AssertionError(f"{image.name} is in both {owners[image]} and {name}")
    kept = sum(split["pairs"] for split in result["splits"].values())
    if kept + result["dropped_cross"] != result["input_pairs"]:
        raise AssertionError(f"{kept} kept + {result['dropped_cross']} dropped != {result['input_pairs']}")
    counts = ", ".join(f"{name} {split['pairs']}" for name, split in result["splits"].items())
    return (
        f"{result['input_pairs']} pairs: {counts}, {result['dropped_cross']} dropped; no image in two splits"
    )


def _check_finetune(workspace: _Workspace) -> str:
    from worker.ml.checkpoints import load_backbone

    out = workspace.root / "finetuned"
    result = workspace.run(
        "finetune",
        *("--checkpoint", workspace.need("parent"), "--arch", "mobilefacenet", "--output-dir", out),
        *("--train-pairs", workspace.need("train pairs"), "--val-pairs", workspace.need("val pairs")),
        *("--epochs", "1", "--batch-size", "16", "--device", "cpu"),
    )
    best = load_backbone(out / "best.pth")
    if best.metadata.get("parent_sha256") != load_backbone(workspace.need("parent")).sha256:
        raise AssertionError("best.pth does not name its parent")
    if result["history"][-1]["train_loss"] is None or result["threshold"] is None:
        raise AssertionError(f"no train loss or no threshold: {result['history']}")
    workspace.files["finetuned"] = out / "best.pth"
    loss = result["history"][-1]["train_loss"]
    return f"{result['pairs']['train']} pairs, 1 epoch, loss {loss:.4f}, threshold {result['threshold']:.4f}"


def _check_evaluate(workspace: _Workspace) -> str:
    pairs = workspace.need("val pairs")
    result = workspace.run(
        "evaluate", "--model", workspace.need("finetuned"), "--pairs", pairs, "--device", "cpu"
    )
    expected = len(json.loads(pairs.read_text()))
    metrics = result["metrics"]
    if metrics["counts"]["pairs"] != expected or metrics["roc_auc"] is None or result["threshold"] is None:
        raise AssertionError(f"unexpected metrics: {metrics['counts']}, AUC {metrics['roc_auc']}")
    return (
        f"{expected} pairs, AUC {metrics['roc_auc']:.4f}, accuracy {metrics['at_threshold']['accuracy']:.4f}"
    )


def _check_validate(workspace: _Workspace) -> str:
    models = ("--pretrained", workspace.need("parent"), "--finetuned", workspace.need("finetuned"))
    pairs = ("--pairs", workspace.need("val pairs"), "--pairs", workspace.need("train pairs"))
    result = workspace.run("validate", *models, *pairs, "--device", "cpu")
    names = [report["name"] for report in result["reports"]]
    if names != ["val.json", "train.json"] or any(r["deltas"]["roc_auc"] is None for r in result["reports"]):
        raise AssertionError(f"unexpected reports: {names}")
    return ", ".join(f"{r['name']} ΔAUC {r['deltas']['roc_auc']:+.4f}" for r in result["reports"])


def _check_embed(workspace: _Workspace) -> str:
    import numpy as np

    npz = workspace.root / "embeddings.npz"
    result = workspace.run(
        "embed", "--model", workspace.need("finetuned"), "--images", workspace.need("faces"), "--output", npz
    )
    with np.load(npz) as stored:
        ids, embeddings, norms = stored["ids"], stored["embeddings"], stored["norms"]
    expected = PEOPLE * IMAGES_PER_PERSON
    if ids.shape != (expected,) or embeddings.shape != (expected, 128) or embeddings.dtype != np.float32:
        raise AssertionError(f"ids {ids.shape}, embeddings {embeddings.shape} {embeddings.dtype}")
    if not np.allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-4) or not (norms > 0).all():
        raise AssertionError("embeddings are not unit length or a norm is not positive")
    return f"{result['count']} images → {embeddings.shape[1]}-d unit embeddings"
