"""The offline `magtune` commands, run in-process through `worker.cli.main` on the real johns faces."""

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from app.durable import file_digest
from tests.conftest import REPO_ROOT
from worker.cli import main
from worker.cli.ml_commands import TRAINING_OPTIONS
from worker.ml.checkpoints import load_backbone
from worker.ml.pairs import read_pairs, write_pairs
from worker.ml.training import TrainConfig

SPLITS = ("train", "val", "test")


def run_json(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> dict:
    code = main([str(a) for a in (*argv, "--json")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def run_failing(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> str:
    """The one stderr line of a command that must refuse its input with exit 2."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


# One xdist worker takes the whole module: its fine-tuned checkpoint is made once, for every test in it.
pytestmark = pytest.mark.xdist_group("ml-commands")


@pytest.fixture(scope="module")
def split_dir(johns_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("splits")
    args = [f"--{name}-output={out / f'{name}.json'}" for name in SPLITS]
    assert main(["split", f"--input={johns_dir / 'pairs.json'}", *args, "--json"]) == 0
    return out


@pytest.fixture(scope="module")
def small_train_pairs(split_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few dozen training pairs, a third of them same-person, so one epoch takes seconds."""
    pairs = read_pairs(split_dir / "train.json").pairs
    chosen = [p for p in pairs if p.label == 1][:8] + [p for p in pairs if p.label == 0][:16]
    path = tmp_path_factory.mktemp("subset") / "train_small.json"
    write_pairs(path, chosen)
    return path


@pytest.fixture(scope="module")
def finetuned(
    mobilefacenet_checkpoint: Path,
    small_train_pairs: Path,
    split_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("finetuned")
    argv = [
        *("finetune", "--checkpoint", mobilefacenet_checkpoint, "--arch", "mobilefacenet"),
        *("--train-pairs", small_train_pairs, "--val-pairs", split_dir / "val.json", "--output-dir", out),
        *("--epochs", "1", "--batch-size", "8", "--device", "cpu", "--json"),
    ]
    with contextlib.redirect_stdout(io.StringIO()) as stdout:  # module-scoped: capsys is not available
        code = main([str(a) for a in argv])
    assert code == 0
    return out, json.loads(stdout.getvalue())


def test_split_puts_every_image_in_one_split(johns_dir: Path, split_dir: Path, capsys) -> None:
    args = [f"--{name}-output={split_dir / 'again' / f'{name}.json'}" for name in SPLITS]
    result = run_json(capsys, "split", "--input", johns_dir / "pairs.json", *args)

    owner: dict[Path, str] = {}
    for name in SPLITS:
        path = split_dir / "again" / f"{name}.json"
        rows = json.loads(path.read_text())
        assert all(not Path(row["image1"]).is_absolute() for row in rows)
        pairs = read_pairs(path).pairs
        assert len(pairs) == result["splits"][name]["pairs"]
        assert sum(p.label for p in pairs) == result["splits"][name]["positives"]
        for image in {i for p in pairs for i in (p.image1, p.image2)}:
            assert owner.setdefault(image, name) == name, f"{image} in {owner[image]} and {name}"
    kept = sum(split["pairs"] for split in result["splits"].values())
    assert result["input_pairs"] == len(read_pairs(johns_dir / "pairs.json").pairs)
    assert kept + result["dropped_cross"] == result["input_pairs"]
    assert result["dropped_cross"] > 0
    assert sum(split["images"] for split in result["splits"].values()) == result["images"]


def test_split_refuses_fractions_that_do_not_sum_to_one(johns_dir: Path, tmp_path: Path, capsys) -> None:
    outputs = [f"--{name}-output={tmp_path / name}.json" for name in SPLITS]
    line = run_failing(
        capsys, "split", "--input", johns_dir / "pairs.json", *outputs, "--train-fraction", "0.9"
    )
    assert "sum to 1" in line
    assert not (tmp_path / "train.json").exists()


def test_evaluate_reports_metrics_for_every_pair(
    mobilefacenet_checkpoint: Path, split_dir: Path, capsys
) -> None:
    test_file = split_dir / "test.json"
    result = run_json(capsys, "evaluate", "--model", mobilefacenet_checkpoint, "--pairs", test_file)

    pairs = read_pairs(test_file).pairs
    assert result["pairs"]["count"] == len(pairs)
    assert result["metrics"]["counts"]["pairs"] == len(pairs)
    assert result["metrics"]["counts"]["positives"] == sum(p.label for p in pairs)
    assert result["model"]["arch"] == "mobilefacenet"
    assert result["model"]["sha256"] == file_digest(mobilefacenet_checkpoint)
    assert result["threshold"] is None and result["threshold_source"] is None
    assert result["metrics"]["at_threshold"]["accuracy"] is None
    assert 0.5 < result["metrics"]["roc_auc"] <= 1.0


def test_evaluate_uses_the_threshold_flag(mobilefacenet_checkpoint: Path, split_dir: Path, capsys) -> None:
    result = run_json(
        capsys,
        "evaluate",
        "--model",
        mobilefacenet_checkpoint,
        "--pairs",
        split_dir / "test.json",
        "--threshold",
        "0.3",
    )
    assert result["threshold"] == 0.3 and result["threshold_source"] == "--threshold"
    assert result["metrics"]["at_threshold"]["threshold"] == 0.3
    assert result["metrics"]["at_threshold"]["accuracy"] is not None


def test_evaluate_text_output_names_the_model(
    mobilefacenet_checkpoint: Path, split_dir: Path, capsys
) -> None:
    assert (
        main(["evaluate", "--model", str(mobilefacenet_checkpoint), "--pairs", str(split_dir / "test.json")])
        == 0
    )
    captured = capsys.readouterr()
    assert "mobilefacenet" in captured.out and "ROC AUC" in captured.out
    assert "no threshold" in captured.err


@pytest.mark.slow
def test_finetune_writes_checkpoints_that_carry_their_lineage(
    finetuned: tuple[Path, dict], mobilefacenet_checkpoint: Path, small_train_pairs: Path
) -> None:
    out, result = finetuned
    parent_sha = file_digest(mobilefacenet_checkpoint)
    assert result["parent"]["sha256"] == parent_sha
    assert result["pairs"]["train"] == len(read_pairs(small_train_pairs).pairs)
    for role in ("best", "final"):
        path = out / f"{role}.pth"
        loaded = load_backbone(path)
        assert loaded.arch == "mobilefacenet"
        assert loaded.sha256 == result[role]["sha256"]
        meta = loaded.metadata
        assert meta["parent_sha256"] == parent_sha
        assert meta["hyperparameters"]["epochs"] == 1 and meta["hyperparameters"]["batch_size"] == 8
        assert meta["threshold"] == result[role]["threshold"]
        assert meta["preprocess"]["channel_order"] == "RGB"
    assert result["threshold"] is not None and -1.0 <= result["threshold"] <= 1.0
    history = json.loads((out / "history.json").read_text())
    assert history["history"] == result["history"]
    assert [r["epoch"] for r in history["history"]] == [0, 1]  # the starting weights are epoch 0
    assert history["history"][1]["train_loss"] > 0


@pytest.mark.slow
def test_finetune_refuses_to_overwrite(
    finetuned: tuple[Path, dict], mobilefacenet_checkpoint: Path, capsys
) -> None:
    out, _ = finetuned
    line = run_failing(
        capsys,
        *(
            "finetune",
            "--checkpoint",
            mobilefacenet_checkpoint,
            "--arch",
            "mobilefacenet",
            "--output-dir",
            out,
        ),
        *("--train-pairs", out / "missing.json"),
    )
    assert "--overwrite" in line and "best.pth" in line


@pytest.mark.slow
def test_evaluate_reads_the_threshold_stored_by_finetune(
    finetuned: tuple[Path, dict], split_dir: Path, capsys
):
    out, trained = finetuned
    result = run_json(capsys, "evaluate", "--model", out / "best.pth", "--pairs", split_dir / "test.json")
    assert result["threshold_source"] == "checkpoint"
    assert result["threshold"] == trained["threshold"]


@pytest.mark.slow
def test_validate_reports_each_pairs_file(
    finetuned: tuple[Path, dict],
    mobilefacenet_checkpoint: Path,
    split_dir: Path,
    small_train_pairs: Path,
    capsys,
) -> None:
    out, _ = finetuned
    files = [split_dir / "test.json", small_train_pairs]
    result = run_json(
        capsys,
        *("validate", "--pretrained", mobilefacenet_checkpoint, "--finetuned", out / "best.pth"),
        *("--pairs", files[0], "--pairs", files[1], "--calibration-pairs", split_dir / "val.json"),
    )
    assert [r["name"] for r in result["reports"]] == ["test.json", "train_small.json"]
    for report, path in zip(result["reports"], files, strict=True):
        count = len(read_pairs(path).pairs)
        assert report["baseline"]["counts"]["pairs"] == report["candidate"]["counts"]["pairs"] == count
        delta = report["candidate"]["roc_auc"] - report["baseline"]["roc_auc"]
        assert report["deltas"]["roc_auc"] == pytest.approx(delta)
    for role in ("pretrained", "finetuned"):
        assert result[role]["threshold_source"].startswith("calibrated on")
    assert result["pretrained"]["sha256"] == file_digest(mobilefacenet_checkpoint)
    assert result["warnings"] == []


def test_embed_writes_unit_embeddings_and_lists_undecodable_files(
    johns_dir: Path, mobilefacenet_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    images = tmp_path / "images"
    sources = (
        sorted((johns_dir / "aligned_112").rglob("*.png"))[:3]
        + sorted((johns_dir / "original").rglob("*.jpg"))[:2]
    )
    for index, source in enumerate(sources):
        target = images / f"group{index % 2}" / f"{index}{source.suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (images / "notes.txt").write_text("not an image")
    npz = tmp_path / "out" / "faces.npz"

    result = run_json(
        capsys, "embed", "--model", mobilefacenet_checkpoint, "--images", images, "--output", npz
    )

    with np.load(npz) as stored:
        ids, embeddings, norms = stored["ids"], stored["embeddings"], stored["norms"]
    assert sorted(ids.tolist()) == sorted(f"group{i % 2}/{i}{s.suffix}" for i, s in enumerate(sources))
    assert embeddings.shape == (len(sources), 128) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert norms.shape == (len(sources),) and (norms > 0).all()
    assert result["count"] == len(sources)
    assert result["resized"] == 2  # the 150×150 originals
    assert [entry["path"] for entry in result["skipped"]] == ["broken.png"]

    line = run_failing(
        capsys, "embed", "--model", mobilefacenet_checkpoint, "--images", images, "--output", npz, "--strict"
    )
    assert "broken.png" in line


@pytest.mark.slow
def test_selftest_passes(capsys) -> None:
    result = run_json(capsys, "selftest")
    assert result["ok"], [c for c in result["checks"] if not c["ok"]]
    assert {c["name"] for c in result["checks"]} >= {
        "backbones",
        "checkpoint",
        "finetune",
        "evaluate",
        "embed",
    }


def test_missing_pairs_file_is_one_line_and_exit_2(
    mobilefacenet_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    missing = tmp_path / "nowhere.json"
    line = run_failing(capsys, "evaluate", "--model", mobilefacenet_checkpoint, "--pairs", missing)
    assert str(missing) in line


def test_wrong_architecture_names_the_right_one(
    mobilefacenet_checkpoint: Path, split_dir: Path, capsys
) -> None:
    line = run_failing(
        capsys,
        "evaluate",
        "--model",
        mobilefacenet_checkpoint,
        "--arch",
        "iresnet50",
        "--pairs",
        split_dir / "test.json",
    )
    assert "iresnet50" in line and "mobilefacenet" in line


def test_corrupt_image_in_pairs_is_named(
    johns_dir: Path, mobilefacenet_checkpoint: Path, tmp_path: Path, capsys
):
    good = next((johns_dir / "aligned_112").rglob("*.png"))
    corrupt = tmp_path / "corrupt_face.png"
    corrupt.write_bytes(good.read_bytes()[:200])  # a truncated PNG
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"image1": str(good), "image2": corrupt.name, "label": 0}]))
    line = run_failing(capsys, "evaluate", "--model", mobilefacenet_checkpoint, "--pairs", pairs)
    assert "corrupt_face.png" in line


def test_errors_print_no_traceback_from_the_installed_command(tmp_path: Path) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.cli",
            "evaluate",
            "--model",
            str(tmp_path / "x.pth"),
            "--pairs",
            "p.json",
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=120,
    )
    assert completed.returncode == 2
    assert completed.stdout == ""
    assert completed.stderr.strip() == f"magtune evaluate: error: {tmp_path / 'x.pth'}: checkpoint not found"


def test_finetune_help_shows_the_training_defaults() -> None:
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    assert {name: default for name, (_, default) in TRAINING_OPTIONS.items()} == {
        name: defaults[name] for name in TRAINING_OPTIONS
    }


def test_finetune_with_interpolation_keeps_the_point_between_parent_and_last_epoch(
    mobilefacenet_checkpoint: Path, small_train_pairs: Path, split_dir: Path, tmp_path: Path, capsys
) -> None:
    result = run_json(
        capsys,
        *("finetune", "--checkpoint", mobilefacenet_checkpoint, "--arch", "mobilefacenet"),
        *(
            "--train-pairs",
            small_train_pairs,
            "--val-pairs",
            split_dir / "val.json",
            "--output-dir",
            tmp_path,
        ),
        *("--epochs", "1", "--batch-size", "8", "--device", "cpu"),
        *("--selection", "interpolate", "--interpolation", "0.5", "--learning-rate", "1e-3"),
    )
    parent = load_backbone(mobilefacenet_checkpoint).model.state_dict()
    best = load_backbone(tmp_path / "best.pth")
    final = load_backbone(tmp_path / "final.pth").model.state_dict()
    assert best.metadata["hyperparameters"]["selection"] == "interpolate"
    moved = 0
    for name, value in best.model.state_dict().items():
        if value.is_floating_point():
            expected = parent[name] + 0.5 * (final[name] - parent[name])
            assert np.allclose(value.numpy(), expected.numpy(), atol=1e-6), name
            moved += not np.array_equal(final[name].numpy(), parent[name].numpy())
    assert moved > 0
    assert result["threshold"] is not None


def test_finetune_refuses_an_unknown_selection(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--selection", "best"])
    assert exit_info.value.code == 2
    assert "argument --selection: invalid choice: 'best'" in capsys.readouterr().err


def test_the_selection_choices_agree_across_api_cli_and_trainer() -> None:
    """The api and the CLI's --help cannot import the trainer (torch), so they repeat its choices."""
    import typing

    from app.jobs.params import FinetuneParams
    from worker.cli.offline import SELECTIONS as CLI_SELECTIONS
    from worker.ml.training import SELECTIONS

    api = typing.get_args(FinetuneParams.model_fields["selection"].annotation)
    assert CLI_SELECTIONS == SELECTIONS == api
