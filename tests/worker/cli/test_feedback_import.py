"""`magtune import` on bad input; the pair file read by one rule for the import and the offline commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.e2e.services import free_port, magtune_command, service_environment
from worker.cli.feedback_import import read_seed_pairs
from worker.cli.offline import read_pair_file
from worker.cli.output import CommandError
from worker.ml.pair_file import PairFileError


def _magtune(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        magtune_command(*args),
        env=service_environment({}),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _write(path: Path, rows: object) -> Path:
    path.write_text(json.dumps(rows))
    return path


def test_seed_pairs_resolve_relative_to_their_file(tmp_path: Path) -> None:
    (tmp_path / "faces").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "faces" / name).write_bytes(b"x")
    rows = [{"image1": "faces/a.png", "image2": "faces/b.png", "label": 1}]
    pairs = read_seed_pairs(_write(tmp_path / "pairs.json", rows))
    assert [(p.image1.name, p.image2.name, p.label) for p in pairs] == [("a.png", "b.png", 1)]
    assert pairs[0].image1 == (tmp_path / "faces" / "a.png").resolve()


def test_seed_pairs_name_every_bad_row(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"y")
    rows = [
        {"image1": "a.png", "image2": "b.png", "label": 1},
        {"image1": "a.png", "image2": "missing.png", "label": 0},
        {"image1": "a.png", "image2": "b.png", "label": True},
        {"image1": "a.png", "image2": "a.png", "label": 1},
        {"image1": "a.png", "label": 1},
    ]
    with pytest.raises(CommandError) as caught:
        read_seed_pairs(_write(tmp_path / "pairs.json", rows))
    message = str(caught.value)
    assert "4 bad rows" in message
    for row in (2, 3, 4, 5):
        assert f"row {row}:" in message
    assert "row 1:" not in message


GOOD_ROW = {"image1": "a.png", "image2": "b.png", "label": 0}
LABEL_RULE = "label must be the integer 1 (same) or 0 (different), got"


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        (
            [GOOD_ROW, {**GOOD_ROW, "label": 1.0}],
            f"row 2: {LABEL_RULE} 1.0",
        ),
        (
            [GOOD_ROW, {**GOOD_ROW, "label": True}],
            f"row 2: {LABEL_RULE} true",
        ),
        (
            [GOOD_ROW, {**GOOD_ROW, "label": 2}],
            f"row 2: {LABEL_RULE} 2",
        ),
        (
            [GOOD_ROW, {**GOOD_ROW, "label": "1"}],
            f'row 2: {LABEL_RULE} "1"',
        ),
        ([GOOD_ROW, {"image1": "a.png", "image2": "b.png"}], "row 2: missing label"),
        ([GOOD_ROW, {"image2": "b.png", "label": 1}], "row 2: missing image1"),
        (
            [GOOD_ROW, ["a.png", "b.png", 1]],
            "row 2: expected an object with image1, image2 and label, got list",
        ),
        (GOOD_ROW, "expected a JSON list of {image1, image2, label} objects, got dict"),
    ],
)
def test_import_and_the_offline_commands_refuse_the_same_rows_alike(
    tmp_path: Path, content: object, complaint: str
) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"y")
    path = _write(tmp_path / "pairs.json", content)
    with pytest.raises(CommandError) as by_import:
        read_seed_pairs(path)
    with pytest.raises(PairFileError) as by_finetune:
        read_pair_file(path)
    assert str(by_import.value) == str(by_finetune.value)
    assert str(path) in str(by_import.value) and complaint in str(by_import.value)


def test_a_label_the_api_refuses_is_refused_by_magtune_import_before_anything_is_sent(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"y")
    rows = [{"image1": "a.png", "image2": "b.png", "label": 1.0}]
    done = _magtune(
        "import", str(_write(tmp_path / "p.json", rows)), "--api", "http://127.0.0.1:9", cwd=tmp_path
    )
    assert done.returncode == 2
    assert f"row 1: {LABEL_RULE} 1.0" in done.stderr
    assert "cannot reach" not in done.stderr


def test_the_import_command_does_not_load_torch() -> None:
    probe = (
        "import sys; from worker.cli import build_parser; import worker.cli.feedback_import; "
        "build_parser(); print(sorted({'torch', 'numpy', 'fastapi', 'sqlalchemy'} & set(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_import_sends_nothing_when_a_row_is_bad(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    rows = [{"image1": "a.png", "image2": "gone.png", "label": 1}]
    done = _magtune(
        "import", str(_write(tmp_path / "p.json", rows)), "--api", "http://127.0.0.1:9", cwd=tmp_path
    )
    assert done.returncode == 2
    assert "row 1: image2 gone.png not found" in done.stderr
    assert "cannot reach" not in done.stderr


def test_import_says_when_the_api_is_unreachable(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"y")
    rows = [{"image1": "a.png", "image2": "b.png", "label": 1}]
    api = f"http://127.0.0.1:{free_port()}"
    done = _magtune("import", str(_write(tmp_path / "p.json", rows)), "--api", api, cwd=tmp_path)
    assert done.returncode == 2
    assert f"cannot reach the api at {api}" in done.stderr
