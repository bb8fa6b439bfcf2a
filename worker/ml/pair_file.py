"""The seed pair file ``[{"image1": path, "image2": path, "label": 1 or 0}, ...]``: its one reader and writer.

Paths are relative to the file's folder (absolute paths are accepted). Reading resolves every path, so two
spellings of one file (or two links to it) are the same image. Extra keys in a row are ignored. A label is
the integer 0 or 1, as the api's feedback takes it: ``true``, ``1.0`` and ``"1"`` are refused, with the row
number and the value as written. Torch-free, so ``magtune import`` (a plain api client) and ``magtune
finetune`` read a file by one rule.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.durable import durable_write

_MAX_PROBLEMS_IN_MESSAGE = 10
_ON_BAD_ROW = ("raise", "skip")


@dataclass(frozen=True)
class LabeledPair:
    """Two images and whether they show the same person (1) or not (0)."""

    image1: Path
    image2: Path
    label: int


@dataclass
class RowProblem:
    row: int  # 1-based position in the file's list
    message: str


class PairFileError(ValueError):
    """A pairs file that cannot be used; ``problems`` lists the bad rows (empty for file-level errors)."""

    def __init__(self, message: str, problems: Sequence[RowProblem] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


@dataclass
class PairReadResult:
    pairs: list[LabeledPair]
    problems: list[RowProblem] = field(default_factory=list)


def read_pairs(path: str | Path, *, on_bad_row: str = "raise") -> PairReadResult:
    """Read a feedback file.

    Bad rows raise one :class:`PairFileError` naming all of them (``"raise"``), or are left out and listed in
    ``problems`` (``"skip"``), so an import can report every mistake in a file at once.
    """
    if on_bad_row not in _ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {_ON_BAD_ROW}, not {on_bad_row!r}")
    path = Path(path)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PairFileError(f"{path}: cannot read the pairs file ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise PairFileError(f"{path}: not UTF-8 text ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise PairFileError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from exc
    if not isinstance(rows, list):
        raise PairFileError(
            f"{path}: expected a JSON list of {{image1, image2, label}} objects, got {type(rows).__name__}"
        )
    folder = path.resolve().parent
    pairs: list[LabeledPair] = []
    problems: list[RowProblem] = []
    for number, row in enumerate(rows, start=1):
        pair_or_problem = _parse_row(row, folder)
        if isinstance(pair_or_problem, str):
            problems.append(RowProblem(number, pair_or_problem))
        else:
            pairs.append(pair_or_problem)
    if problems and on_bad_row == "raise":
        raise PairFileError(_describe_problems(path, problems), problems)
    return PairReadResult(pairs=pairs, problems=problems)


def _parse_row(row: Any, folder: Path) -> LabeledPair | str:
    """A pair, or what is wrong with the row."""
    if not isinstance(row, dict):
        return f"expected an object with image1, image2 and label, got {type(row).__name__}"
    missing = [key for key in ("image1", "image2", "label") if key not in row]
    if missing:
        return f"missing {', '.join(missing)}"
    label = row["label"]
    if type(label) is not int or label not in (0, 1):
        return f"label must be the integer 1 (same) or 0 (different), got {json.dumps(label)}"
    images: list[Path] = []
    for key in ("image1", "image2"):
        value = row[key]
        if not isinstance(value, str) or not value:
            return f"{key} must be a non-empty path string, got {json.dumps(value)}"
        image = (folder / value).resolve()
        if not image.is_file():
            return f"{key} {value} not found ({image})"
        images.append(image)
    if images[0] == images[1]:
        return f"image1 and image2 are the same file ({images[0]})"
    return LabeledPair(images[0], images[1], label)


def _describe_problems(path: Path, problems: list[RowProblem]) -> str:
    rows = ", ".join(str(p.row) for p in problems[:_MAX_PROBLEMS_IN_MESSAGE])
    more = len(problems) - _MAX_PROBLEMS_IN_MESSAGE
    if more > 0:
        rows += f" and {more} more"
    details = "; ".join(f"row {p.row}: {p.message}" for p in problems[:_MAX_PROBLEMS_IN_MESSAGE])
    plural = "row" if len(problems) == 1 else "rows"
    return f"{path}: {len(problems)} bad {plural} ({plural} {rows}): {details}"


def write_pairs(path: str | Path, pairs: Iterable[LabeledPair]) -> None:
    """Write pairs in the feedback format, with paths relative to the output file's folder."""
    path = Path(path)
    folder = path.resolve().parent
    rows = [
        {
            "image1": Path(os.path.relpath(Path(p.image1).resolve(), folder)).as_posix(),
            "image2": Path(os.path.relpath(Path(p.image2).resolve(), folder)).as_posix(),
            "label": int(p.label),
        }
        for p in pairs
    ]
    with durable_write(path) as stream:
        stream.write((json.dumps(rows, indent=1) + "\n").encode("utf-8"))
