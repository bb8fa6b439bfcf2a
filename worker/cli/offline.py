"""The offline commands' bodies: fine-tune, evaluate, validate, split and embed straight from files.

Each ``*_command(args) -> dict`` returns its result and raises on bad input; `output.guarded` turns that
into printed text or JSON and an exit code, and `magtune selftest` calls the same functions. Library imports
sit inside the functions so `magtune --help` stays instant."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.durable import durable_write
from worker.cli import output
from worker.cli.output import CommandError, Result

if TYPE_CHECKING:
    import torch

    from worker.ml.checkpoints import LoadedBackbone
    from worker.ml.pair_file import LabeledPair
    from worker.ml.pairs import IndexedPairs
    from worker.ml.preprocessing import ImageCache, PreprocessSpec

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Option name → TrainConfig field; the defaults in --help are TrainConfig's (a test keeps them in step).
TRAINING_OPTIONS = {
    "epochs": (int, 10),
    "learning_rate": (float, 1e-4),
    "batch_size": (int, 16),
    "margin": (float, 1.4),
    "seed": (int, 0),
    "patience": (int, 3),
    "weight_decay": (float, 0.0),
    "distill_weight": (float, 1.0),
    "interpolation": (float, 0.5),
}
SELECTIONS = ("val", "interpolate")  # worker.ml.training.SELECTIONS, without importing torch for --help


def finetune_command(args: argparse.Namespace) -> Result:
    from worker.ml.checkpoints import save_checkpoint
    from worker.ml.embedding import select_device
    from worker.ml.splits import file_digest
    from worker.ml.training import TrainConfig, finetune

    overrides = {name: getattr(args, name) for name in TRAINING_OPTIONS if getattr(args, name) is not None}
    config = TrainConfig(**overrides, freeze_stem=args.freeze_stem, selection=args.selection)
    device = select_device(args.device)
    out: Path = args.output_dir
    best_path, final_path, history_path = (out / name for name in ("best.pth", "final.pth", "history.json"))
    if out.exists() and not out.is_dir():
        raise CommandError(f"{out}: exists and is not a directory")
    existing = [str(p) for p in (best_path, final_path) if p.exists()]
    if existing and not args.overwrite:
        raise CommandError(f"{', '.join(existing)} already exist; pass --overwrite to replace them")
    parent = load_model(args.checkpoint, args.arch)
    spec = model_spec(parent)
    cache = _image_cache(spec)
    train_pairs = read_pair_file(args.train_pairs)
    val_pairs = read_pair_file(args.val_pairs) if args.val_pairs is not None else None
    warnings = [output.warn(w) for w in _finetune_warnings(train_pairs, val_pairs)]
    show = output.bars_enabled(args.json)
    train = index_pair_file(train_pairs, cache, show, "decode train")
    val = index_pair_file(val_pairs, cache, show, "decode val") if val_pairs is not None else None

    bar = output.TrainingBar(show)
    try:
        result = finetune(parent.model, spec, train, val, config, progress=bar, device=device)
    finally:
        bar.close()
    model = parent.model
    final_epoch = result.history[-1].epoch if result.history else config.epochs
    final_threshold = result.threshold
    if val is not None and final_epoch != result.best_epoch:
        model.load_state_dict(result.final_state)
        final_threshold = _calibrated_threshold(model, spec, val, device)
    history = [record.to_dict() for record in result.history]
    lineage = {
        "created_by": "magtune finetune",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "parent_sha256": parent.sha256,
        "parent_file": args.checkpoint.name,
        "hyperparameters": config.to_dict(),
        "preprocess": spec.to_dict(),
        "threshold_source": "val" if val is not None else None,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "history": history,
        "data": {
            "train_pairs": len(train),
            "train_pairs_sha256": file_digest(args.train_pairs),
            "val_pairs": len(val) if val is not None else 0,
            "val_pairs_sha256": file_digest(args.val_pairs) if val is not None else None,
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    saved = {}
    for role, path, state, epoch, threshold in (
        ("final", final_path, result.final_state, final_epoch, final_threshold),
        ("best", best_path, result.best_state, result.best_epoch, result.threshold),
    ):
        model.load_state_dict(state)
        metadata = {**lineage, "threshold": threshold}
        sha256 = save_checkpoint(path, model.cpu(), arch=args.arch, epoch=epoch, metadata=metadata)
        saved[role] = {"path": path, "sha256": sha256, "epoch": epoch, "threshold": threshold}
    summary = {"best_epoch": result.best_epoch, "stopped_early": result.stopped_early, "history": history}
    with durable_write(history_path) as stream:
        stream.write((json.dumps(output.plain(summary), indent=2) + "\n").encode("utf-8"))
    if val is not None and result.best_epoch == 0:
        warnings.append(output.warn("no epoch beat the starting weights on val: best.pth holds the parent's"))
    return {
        "parent": describe_model(args.checkpoint, parent),
        "pairs": {"train": len(train), "val": len(val) if val is not None else 0},
        "config": config.to_dict(),
        **saved,
        "threshold": result.threshold,
        "stopped_early": result.stopped_early,
        "history": history,
        "history_path": history_path,
        "warnings": warnings,
    }


def _finetune_warnings(train: list[LabeledPair], val: list[LabeledPair] | None) -> list[str]:
    if val is None:
        return ["no --val-pairs: best.pth is the last epoch and no threshold is calibrated"]
    shared = _images(train) & _images(val)
    if shared:
        return [f"{len(shared)} images appear in both train and val pairs; `magtune split` keeps them apart"]
    return []


def _calibrated_threshold(model: Any, spec: PreprocessSpec, val: IndexedPairs, device: Any) -> float | None:
    from worker.ml.evaluation import score_pairs
    from worker.ml.metrics import calibrate_threshold

    return calibrate_threshold(score_pairs(model, spec, val, device=device), val.labels.numpy())


def evaluate_command(args: argparse.Namespace) -> Result:
    from worker.ml.embedding import select_device
    from worker.ml.evaluation import evaluate

    device = select_device(args.device)
    loaded = load_model(args.model, args.arch)
    spec = model_spec(loaded)
    pairs = index_pair_file(
        read_pair_file(args.pairs), _image_cache(spec), output.bars_enabled(args.json), "decode"
    )
    threshold, source = args.threshold, "--threshold" if args.threshold is not None else None
    if threshold is None and loaded.metadata.get("threshold") is not None:
        threshold, source = float(loaded.metadata["threshold"]), "checkpoint"
    warnings = []
    if threshold is None:
        warnings.append(output.warn("no threshold: the checkpoint stores none and --threshold is unset"))
    metrics = evaluate(loaded.model, spec, pairs, threshold, threshold_source=source or "none", device=device)
    return {
        "model": describe_model(args.model, loaded),
        "pairs": {"path": args.pairs, "count": len(pairs), "images": pairs.image_count},
        "threshold": threshold,
        "threshold_source": source,
        "metrics": metrics,
        "warnings": warnings,
    }


def validate_command(args: argparse.Namespace) -> Result:
    from worker.ml.embedding import select_device
    from worker.ml.evaluation import ModelUnderTest, compare_models

    device = select_device(args.device)
    files = {"pretrained": args.pretrained, "finetuned": args.finetuned}
    models = {role: load_model(path, args.arch) for role, path in files.items()}
    specs = {role: model_spec(loaded) for role, loaded in models.items()}
    cache = _image_cache(specs["pretrained"])
    pair_sets = [read_pair_file(path) for path in args.pairs]
    warnings = [output.warn(w) for w in _validate_warnings(models, args.pairs, args.calibration_pairs)]
    show = output.bars_enabled(args.json)
    thresholds: dict[str, tuple[float | None, str | None]] = {}
    for role, loaded in models.items():
        stored = loaded.metadata.get("threshold")
        thresholds[role] = (float(stored), "checkpoint") if stored is not None else (None, None)
    if args.calibration_pairs is not None:
        calibration = index_pair_file(
            read_pair_file(args.calibration_pairs), cache, show, "decode calibration"
        )
        for role, loaded in models.items():
            value = _calibrated_threshold(loaded.model, specs[role], calibration, device)
            thresholds[role] = (
                value,
                f"calibrated on {args.calibration_pairs}" if value is not None else None,
            )
    entries = {
        role: ModelUnderTest(loaded.model, specs[role], thresholds[role][0], thresholds[role][1] or "none")
        for role, loaded in models.items()
    }
    reports = []
    for path, name, pairs in zip(args.pairs, report_names(args.pairs), pair_sets, strict=True):
        indexed = index_pair_file(pairs, cache, show, f"decode {name}")
        comparison = compare_models(entries["pretrained"], entries["finetuned"], indexed, device=device)
        reports.append({"name": name, "path": path, **comparison})
    described = {
        role: {
            **describe_model(files[role], loaded),
            "threshold": thresholds[role][0],
            "threshold_source": thresholds[role][1],
        }
        for role, loaded in models.items()
    }
    return {
        **described,
        "calibration_pairs": args.calibration_pairs,
        "reports": reports,
        "warnings": warnings,
    }


def _validate_warnings(
    models: dict[str, LoadedBackbone], pair_files: Sequence[Path], calibration: Path | None
) -> list[str]:
    warnings = []
    pretrained, finetuned = models["pretrained"], models["finetuned"]
    parent = finetuned.metadata.get("parent_sha256")
    if finetuned.sha256 == pretrained.sha256:
        warnings.append("--pretrained and --finetuned are the same checkpoint")
    elif parent is not None and parent != pretrained.sha256:
        warnings.append(
            f"the fine-tuned checkpoint's parent is {parent[:12]}, not the --pretrained checkpoint"
        )
    if calibration is not None and any(p.resolve() == calibration.resolve() for p in pair_files):
        warnings.append("the calibration pairs are also reported: their accuracy there is optimistic")
    if calibration is None and any(m.metadata.get("threshold") is None for m in models.values()):
        warnings.append("a model has no stored threshold: pass --calibration-pairs to compare accuracies")
    return warnings


def report_names(paths: Sequence[Path]) -> list[str]:
    """File names, or the paths as given where two files share a name."""
    names = [path.name for path in paths]
    return [name if names.count(name) == 1 else str(path) for name, path in zip(names, paths, strict=True)]


def split_command(args: argparse.Namespace) -> Result:
    from worker.ml.pair_file import write_pairs
    from worker.ml.splits import SPLIT_NAMES, file_digest, split_pairs, validate_split_fractions

    outputs: dict[str, Path] = {name: getattr(args, f"{name}_output") for name in SPLIT_NAMES}
    fractions = validate_split_fractions({name: getattr(args, f"{name}_fraction") for name in SPLIT_NAMES})
    targets = [path.resolve() for path in outputs.values()]
    if len(set(targets)) != len(targets) or args.input.resolve() in targets:
        raise CommandError("the three output files must differ from each other and from --input")
    pairs = read_pair_file(args.input)
    images = sorted(_images(pairs))
    bar = output.progress(images, total=len(images), desc="hash", enabled=output.bars_enabled(args.json))
    result = split_pairs(pairs, fractions, digests={image: file_digest(image) for image in bar})
    splits: dict[str, Any] = {}
    warnings: list[str] = []
    for name, path in outputs.items():
        chosen = result.splits[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        write_pairs(path, chosen)
        positives = sum(p.label for p in chosen)
        counts = {"pairs": len(chosen), "positives": positives, "negatives": len(chosen) - positives}
        splits[name] = {"path": path, **counts, "images": result.image_counts[name]}
        if fractions[name] > 0 and (positives == 0 or positives == len(chosen)):
            kind = "same" if positives == 0 else "different"
            warnings.append(output.warn(f"the {name} split has no {kind}-person pairs"))
    return {
        "input": args.input,
        "input_pairs": len(pairs),
        "images": len(images),
        "fractions": fractions,
        "splits": splits,
        "dropped_cross": result.dropped_cross,
        "warnings": warnings,
    }


def embed_command(args: argparse.Namespace) -> Result:
    import numpy as np
    import torch

    from worker.ml.embedding import embed_pixels, select_device
    from worker.ml.preprocessing import ImageDecodeError, decode_image

    root: Path = args.images
    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not root.is_dir():
        raise CommandError(f"{root}: not a directory")
    device = select_device(args.device)
    loaded = load_model(args.model, args.arch)
    spec = model_spec(loaded)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise CommandError(f"{root}: no {'/'.join(IMAGE_SUFFIXES)} files found")
    ids: list[str] = []
    skipped: list[dict[str, str]] = []
    pending: list[torch.Tensor] = []
    parts: list[Any] = []
    resized = 0
    bar = output.progress(
        files, total=len(files), desc="embed", enabled=output.bars_enabled(args.json), unit="img"
    )
    for number, path in enumerate(bar, start=1):
        try:
            decoded = decode_image(path, size=spec.size)
        except ImageDecodeError as exc:
            if args.strict:
                raise
            skipped.append({"path": path.relative_to(root).as_posix(), "reason": exc.reason})
            output.warn(f"skipped {exc}")
        else:
            pending.append(decoded.pixels)
            resized += decoded.resized
            ids.append(path.relative_to(root).as_posix())
        if pending and (len(pending) == args.batch_size or number == len(files)):
            parts.append(embed_pixels(loaded.model, spec, torch.stack(pending), device=device))
            pending = []
    if not ids:
        raise CommandError(f"{root}: none of the {len(files)} image files could be decoded")
    embeddings = torch.cat([part.embeddings for part in parts]).numpy().astype(np.float32)
    norms = torch.cat([part.norms for part in parts]).numpy().astype(np.float32)
    _write_npz(
        args.output,
        ids=np.array(ids, dtype=str),
        embeddings=embeddings,
        norms=norms,
        arch=np.array(loaded.arch),
        model_sha256=np.array(loaded.sha256),
    )
    return {
        "model": describe_model(args.model, loaded),
        "images": root,
        "output": args.output,
        "count": len(ids),
        "dimension": int(embeddings.shape[1]),
        "resized": resized,
        "skipped": skipped,
    }


# Shared steps.


def load_model(path: Path, arch: str | None) -> LoadedBackbone:
    from worker.ml.checkpoints import load_backbone

    if not path.is_file():
        raise CommandError(f"{path}: checkpoint not found")
    return load_backbone(path, arch)


def model_spec(loaded: LoadedBackbone) -> PreprocessSpec:
    """The preprocessing stored with a fine-tuned checkpoint, else the architecture's own."""
    from worker.ml.preprocessing import model_preprocess_spec

    return model_preprocess_spec(loaded.arch, loaded.metadata.get("preprocess"))


def describe_model(path: Path, loaded: LoadedBackbone) -> Result:
    return {"path": path, "arch": loaded.arch, "sha256": loaded.sha256}


def read_pair_file(path: Path) -> list[LabeledPair]:
    from worker.ml.pair_file import read_pairs

    if not path.is_file():
        raise CommandError(f"{path}: pairs file not found")
    pairs = read_pairs(path).pairs
    if not pairs:
        raise CommandError(f"{path}: no pairs in the file")
    return pairs


def index_pair_file(
    pairs: list[LabeledPair], cache: ImageCache, show_progress: bool, desc: str
) -> IndexedPairs:
    """Decode every distinct image once (with a progress bar), then index the pairs into them."""
    from worker.ml.pairs import index_pairs

    images = sorted(_images(pairs))
    for image in output.progress(images, total=len(images), desc=desc, enabled=show_progress, unit="img"):
        cache.get(image)
    return index_pairs(pairs, cache)


def _image_cache(spec: PreprocessSpec) -> ImageCache:
    from worker.ml.preprocessing import ImageCache

    return ImageCache(spec.size)


def _images(pairs: Sequence[LabeledPair]) -> set[Path]:
    return {Path(image).resolve() for pair in pairs for image in (pair.image1, pair.image2)}


def _write_npz(path: Path, **arrays: Any) -> None:
    """What ``np.savez`` writes, streamed into a durable file (``np.savez`` wants a seekable one)."""
    import zipfile

    import numpy as np

    with durable_write(path) as out, zipfile.ZipFile(out, "w", allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array))
