"""How the offline commands talk: one result per command, as text for people or as one JSON document.

stdout carries only the result, so `magtune evaluate --json ... | jq` always parses. Progress bars, warnings
and errors go to stderr; bars only when stderr is a terminal and --json is off. A failing command prints one
line naming the problem and exits with :data:`EXIT_BAD_INPUT`; tracebacks are for bugs, not for bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

Result = dict[str, Any]
Renderer = Callable[[Result], str]
T = TypeVar("T")


class CommandError(Exception):
    """Bad input the user can fix (a missing file, an impossible option); printed as one line, exit 2."""


def guarded(
    command: Callable[[argparse.Namespace], Result], render: Renderer
) -> Callable[[argparse.Namespace], int]:
    """Wrap a command so that its result is printed and bad input becomes one stderr line and exit 2.

    ValueError covers the library's input errors (PairFileError, ImageDecodeError, CheckpointError, bad
    training parameters); OSError covers files that cannot be read or written.
    """

    def handler(args: argparse.Namespace) -> int:
        try:
            result = command(args)
        except (CommandError, ValueError, OSError) as exc:
            error(args.command, _describe(exc))
            return EXIT_BAD_INPUT
        except KeyboardInterrupt:
            error(args.command, "interrupted")
            return EXIT_INTERRUPTED
        emit(result, as_json=args.json, render=render)
        return EXIT_OK

    return handler


def _describe(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"{exc.filename}: no such file or directory"
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    return " ".join(str(exc).split()) or type(exc).__name__


def error(command: str, message: str) -> None:
    print(f"magtune {command}: error: {message}", file=sys.stderr)


def warn(message: str) -> str:
    """Say it on stderr now (a warning can matter before a long run ends); returned for the result's list."""
    print(f"magtune: warning: {message}", file=sys.stderr)
    return message


def emit(result: Mapping[str, Any], *, as_json: bool, render: Renderer) -> None:
    if as_json:
        print(json.dumps(plain(result), indent=2, allow_nan=False))
    else:
        print(render(plain(result)))


def plain(value: Any) -> Any:
    """JSON-ready copy: paths as strings, numpy scalars as numbers, NaN/inf as None (JSON has neither)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bool | int | str) or value is None:
        return value
    if hasattr(value, "item"):  # numpy and torch scalars
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def bars_enabled(as_json: bool) -> bool:
    return not as_json and sys.stderr.isatty()


def progress(items: Iterable[T], *, total: int, desc: str, enabled: bool, unit: str = "it") -> Iterable[T]:
    return tqdm(items, total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, leave=False)


class TrainingBar:
    """One bar over all steps of a fine-tune, fed by the trainer's progress callback; a line per epoch."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: tqdm | None = None

    def __call__(self, update: Any) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = tqdm(
                total=update.epochs * update.steps, desc="fine-tune", unit="step", file=sys.stderr
            )
        self.bar.n = (update.epoch - 1) * update.steps + update.step
        if update.loss is not None:
            self.bar.set_postfix(
                epoch=f"{update.epoch}/{update.epochs}", loss=f"{update.loss:.4f}", refresh=False
            )
        self.bar.refresh()
        if update.phase == "epoch":
            auc = "n/a" if update.val_auc is None else f"{update.val_auc:.4f}"
            self.bar.write(
                f"epoch {update.epoch}: train loss {_num(update.loss)}, val AUC {auc}", file=sys.stderr
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# Text renderers, one per command. They receive the plain (JSON-ready) result.


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _signed(value: Any) -> str:
    return "n/a" if value is None else f"{value:+.4f}"


def _short(sha256: str | None) -> str:
    return (sha256 or "")[:12]


def format_metrics(metrics: Result, indent: str = "  ") -> list[str]:
    rows = [
        ("pairs", _counts(metrics["counts"])),
        ("ROC AUC", _num(metrics["roc_auc"])),
        ("EER", f"{_num(metrics['eer'])} (threshold {_num(metrics['eer_threshold'])})"),
    ]
    for label, block in (("threshold", metrics["at_threshold"]), ("fixed 0.4", metrics["at_0_4"])):
        if block["threshold"] is None:
            rows.append((label, "none"))
            continue
        rows.append(
            (
                label,
                f"{_num(block['threshold'])}: accuracy {_num(block['accuracy'])}, precision "
                f"{_num(block['precision'])}, recall {_num(block['recall'])}, F1 {_num(block['f1'])} "
                f"(tp {block['tp']}, fp {block['fp']}, tn {block['tn']}, fn {block['fn']})",
            )
        )
    for entry in metrics["tar_at_far"]:
        note = "" if entry["enough_negatives"] else " (too few negatives for this FAR)"
        figures = f"{_num(entry['tar'])} (FAR {_num(entry['far'])}, threshold {_num(entry['threshold'])})"
        rows.append((f"TAR@FAR {entry['far_target']:g}", figures + note))
    best = metrics["best_accuracy"]
    rows.append(("best accuracy", f"{_num(best['accuracy'])} at threshold {_num(best['threshold'])}"))
    return [f"{indent}{label:<14}{text}" for label, text in rows]


def _counts(counts: Result) -> str:
    return f"{counts['pairs']} pairs ({counts['positives']} same, {counts['negatives']} different)"


def _saved(role: str, saved: Result) -> str:
    return f"{role + ':':<6} {saved['path']} (epoch {saved['epoch']}, sha256 {saved['sha256']})"


def render_model(label: str, model: Result) -> str:
    return f"{label}: {model['path']} ({model['arch']}, sha256 {_short(model['sha256'])})"


def render_evaluate(result: Result) -> str:
    source = (
        result["threshold_source"] or "none: pass --threshold, or use a checkpoint from `magtune finetune`"
    )
    lines = [
        render_model("model", result["model"]),
        f"pairs: {result['pairs']['path']}",
        f"threshold: {_num(result['threshold'])} ({source})",
        *format_metrics(result["metrics"]),
    ]
    return "\n".join(lines)


def render_finetune(result: Result) -> str:
    lines = [
        render_model("parent", result["parent"]),
        f"pairs: {result['pairs']['train']} train, {result['pairs']['val']} val",
        *(_saved(role, result[role]) for role in ("best", "final")),
        f"threshold (calibrated on val): {_num(result['threshold'])}",
        f"history: {result['history_path']}" + (" (stopped early)" if result["stopped_early"] else ""),
        "  epoch  train loss  val loss  val AUC",
    ]
    for record in result["history"]:
        lines.append(
            f"  {record['epoch']:>5}  {_num(record['train_loss']):>10}  {_num(record['val_loss']):>8}"
            f"  {_num(record['val_auc']):>7}"
        )
    return "\n".join(lines)


def render_validate(result: Result) -> str:
    lines = [render_model("pretrained", result["pretrained"]), render_model("finetuned", result["finetuned"])]
    for role in ("pretrained", "finetuned"):
        model = result[role]
        lines.append(f"{role} threshold: {_num(model['threshold'])} ({model['threshold_source'] or 'none'})")
    for report in result["reports"]:
        base, cand, deltas = report["baseline"], report["candidate"], report["deltas"]
        counts = base["counts"]
        lines += [
            "",
            f"{report['name']}: {_counts(counts)}",
            f"  {'':<14}{'pretrained':>11}{'finetuned':>11}{'delta':>9}",
            _row("ROC AUC", base["roc_auc"], cand["roc_auc"], deltas["roc_auc"]),
            _row("EER", base["eer"], cand["eer"], deltas["eer"]),
            _row(
                "accuracy",
                base["at_threshold"]["accuracy"],
                cand["at_threshold"]["accuracy"],
                deltas["accuracy"],
            ),
            _row(
                "accuracy@0.4",
                base["at_0_4"]["accuracy"],
                cand["at_0_4"]["accuracy"],
                _difference(cand["at_0_4"]["accuracy"], base["at_0_4"]["accuracy"]),
            ),
        ]
    return "\n".join(lines)


def _row(label: str, base: Any, cand: Any, delta: Any) -> str:
    return f"  {label:<14}{_num(base):>11}{_num(cand):>11}{_signed(delta):>9}"


def _difference(new: float | None, old: float | None) -> float | None:
    return None if new is None or old is None else new - old


def render_split(result: Result) -> str:
    lines = [f"input: {result['input']} ({result['input_pairs']} pairs, {result['images']} images)"]
    for name, split in result["splits"].items():
        lines.append(f"  {name:<5} {_counts(split)}, {split['images']} images -> {split['path']}")
    lines.append(f"  dropped {result['dropped_cross']} pairs whose images fall in different splits")
    return "\n".join(lines)


def render_embed(result: Result) -> str:
    lines = [
        render_model("model", result["model"]),
        f"embedded {result['count']} images from {result['images']} -> {result['output']} "
        f"(dimension {result['dimension']}; {result['resized']} resized to 112×112)",
    ]
    if result["skipped"]:
        lines.append(f"skipped {len(result['skipped'])} undecodable files:")
        lines += [f"  {entry['path']}: {entry['reason']}" for entry in result["skipped"]]
    return "\n".join(lines)


def render_selftest(result: Result) -> str:
    lines = [
        f"{'ok  ' if c['ok'] else 'FAIL'} {c['name']:<11} {c['seconds']:6.2f} s  {c['detail']}"
        for c in result["checks"]
    ]
    passed = sum(check["ok"] for check in result["checks"])
    lines.append(f"{passed}/{len(result['checks'])} checks passed in {result['seconds']:.1f} s")
    return "\n".join(lines)
