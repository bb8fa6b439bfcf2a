"""Checkpoints: MagFace layouts load strictly, foreign or hostile files are refused, saves round-trip."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app.blobs import BlobStore
from app.durable import file_digest
from tests.worker.ml.magface import HEAD_CLASSES, magface_layout
from worker.ml.backbones import ARCHITECTURES, build_backbone
from worker.ml.checkpoints import (
    CheckpointError,
    backbone_state_dict,
    detect_architecture,
    load_backbone,
    read_state_dict,
    save_checkpoint,
    write_checkpoint,
)

IRESNETS = ("iresnet18", "iresnet34", "iresnet50", "iresnet100")
PREFIXES = ("features.module.", "module.features.", "")
MOBILEFACENET_SHA256 = "90a00ba1d8b0b688af3deb731ed53dca582e6106805d1bc3cfdef55f570493f4"  # shared/README.md

Tensors = dict[str, torch.Tensor]


class RunsShellCommand:
    """Unpickling this runs a shell command: what a hostile checkpoint would carry."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


def assert_same_tensors(model: torch.nn.Module, tensors: Tensors) -> None:
    state = model.state_dict()
    assert list(state) == list(tensors)
    for key, tensor in tensors.items():
        assert state[key].dtype == tensor.dtype, key
        assert torch.equal(state[key], tensor), key


def assert_one_sentence(error: CheckpointError, *fragments: str) -> None:
    message = str(error)
    assert "\n" not in message and len(message) < 400, message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("prefix", PREFIXES, ids=["ddp", "dp", "bare"])
@pytest.mark.parametrize("arch", IRESNETS)
def test_magface_checkpoint_loads_strictly(
    arch: str,
    prefix: str,
    random_backbone: Callable[[str], Tensors],
    write_checkpoint: Callable[..., Path],
) -> None:
    tensors = random_backbone(arch)
    path = write_checkpoint(f"{arch}.pth", magface_layout(tensors, prefix=prefix, arch=arch))
    loaded = load_backbone(path)
    assert loaded.arch == arch
    assert not loaded.model.training
    assert loaded.epoch == 25 and loaded.metadata == {}
    assert_same_tensors(loaded.model, tensors)
    assert all(p.requires_grad for p in loaded.model.parameters())


@pytest.mark.parametrize("prefix", PREFIXES, ids=["ddp", "dp", "bare"])
@pytest.mark.parametrize("wrapped", [True, False], ids=["wrapped", "bare-dict"])
def test_head_is_dropped_and_backbone_fc_kept(
    prefix: str,
    wrapped: bool,
    random_backbone: Callable[[str], Tensors],
    write_checkpoint: Callable[..., Path],
) -> None:
    tensors = random_backbone("iresnet18")
    payload = magface_layout(tensors, prefix=prefix, wrapped=wrapped, arch="iresnet18")
    path = write_checkpoint("iresnet18.pth", payload)
    state_dict, metadata = read_state_dict(path)
    assert metadata == {}
    assert list(state_dict) == list(tensors)
    assert state_dict["fc.weight"].shape == (512, 25088)
    assert torch.equal(state_dict["fc.weight"], tensors["fc.weight"])
    assert load_backbone(path, "iresnet18").arch == "iresnet18"


def test_loaded_parameters_own_their_memory(
    random_backbone: Callable[[str], Tensors], write_checkpoint: Callable[..., Path]
) -> None:
    """A half-precision file whose tensors share storage still gives float32 parameters that alias nothing."""
    tensors = {
        key: t.half() if t.is_floating_point() else t for key, t in random_backbone("iresnet18").items()
    }
    tensors["bn1.running_var"] = tensors["bn1.running_mean"]
    tensors["bn1.bias"] = tensors["bn1.weight"][:]
    model = load_backbone(write_checkpoint("shared.pth", tensors)).model
    state = model.state_dict()
    assert {t.dtype for k, t in state.items() if not k.endswith("num_batches_tracked")} == {torch.float32}
    pointers = [t.untyped_storage().data_ptr() for t in state.values()]
    assert len(set(pointers)) == len(pointers)
    assert torch.equal(state["bn1.running_var"], tensors["bn1.running_mean"].float())
    model.bn1.running_mean.zero_()
    assert model.bn1.running_var.abs().sum() > 0


def test_head_beside_a_bare_backbone_is_dropped(random_backbone: Callable[[str], Tensors]) -> None:
    tensors = random_backbone("iresnet18")
    with_head = {**tensors, "parallel_fc.weight": torch.randn(HEAD_CLASSES, 512)}
    assert list(backbone_state_dict(with_head)) == list(tensors)


def test_dataparallel_wrapped_backbones_keep_their_own_keys(
    random_backbone: Callable[[str], Tensors], mobilefacenet_checkpoint: Path
) -> None:
    """Under plain ``module.``, ``module.fc.weight`` is the backbone's fc, and MobileFaceNet's
    ``module.features.N`` keys are not MagFace's ``module.features.`` prefix."""
    iresnet = random_backbone("iresnet18")
    stripped = backbone_state_dict({f"module.{k}": v for k, v in iresnet.items()})
    assert list(stripped) == list(iresnet)
    mobilefacenet = torch.load(mobilefacenet_checkpoint, map_location="cpu", weights_only=True)
    stripped = backbone_state_dict({f"module.{k}": v for k, v in mobilefacenet.items()})
    assert list(stripped) == list(mobilefacenet)
    assert detect_architecture({f"module.{k}": v for k, v in mobilefacenet.items()}) == "mobilefacenet"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_detect_architecture(arch: str) -> None:
    with torch.device("meta"):
        state_dict = build_backbone(arch).state_dict()
    assert detect_architecture(state_dict) == arch
    assert detect_architecture({f"features.module.{k}": v for k, v in state_dict.items()}) == arch
    first_key = next(iter(state_dict))
    assert detect_architecture({k: v for k, v in state_dict.items() if k != first_key}) is None


def test_shared_mobilefacenet_loads_strictly(mobilefacenet_checkpoint: Path) -> None:
    original = torch.load(mobilefacenet_checkpoint, map_location="cpu", weights_only=True)
    loaded = load_backbone(mobilefacenet_checkpoint)
    assert (loaded.arch, loaded.metadata, loaded.epoch) == ("mobilefacenet", {}, None)
    assert loaded.sha256 == MOBILEFACENET_SHA256 == file_digest(mobilefacenet_checkpoint)
    assert_same_tensors(loaded.model, original)
    with torch.inference_mode():
        assert loaded.model(torch.rand(1, 3, 112, 112)).shape == (1, 128)


def test_wrong_architecture_names_the_one_that_fits(
    random_backbone: Callable[[str], Tensors], write_checkpoint: Callable[..., Path]
) -> None:
    payload = magface_layout(random_backbone("iresnet18"), prefix="features.module.", arch="iresnet18")
    path = write_checkpoint("magface18.pth", payload)
    with pytest.raises(CheckpointError) as raised:
        load_backbone(path, "iresnet50")
    assert raised.value.suggested_arch == "iresnet18"
    assert_one_sentence(
        raised.value, "magface18.pth", "iresnet50", "475 tensors expected, 187 found", "iresnet18"
    )


def test_mobilefacenet_as_iresnet_suggests_mobilefacenet(mobilefacenet_checkpoint: Path) -> None:
    with pytest.raises(CheckpointError) as raised:
        load_backbone(mobilefacenet_checkpoint, "iresnet18")
    assert raised.value.suggested_arch == "mobilefacenet"
    assert_one_sentence(
        raised.value, "mobilefacenet.pt", "187 tensors expected, 307 found", "fits mobilefacenet"
    )


def test_file_that_fits_nothing_says_which_is_closest(
    random_backbone: Callable[[str], Tensors], write_checkpoint: Callable[..., Path]
) -> None:
    tensors = dict(random_backbone("iresnet50"))
    tensors["fc.weight"] = torch.randn(256, 25088)
    path = write_checkpoint("odd.pth", tensors)
    with pytest.raises(CheckpointError) as raised:
        load_backbone(path)
    assert raised.value.suggested_arch is None
    assert_one_sentence(
        raised.value, "odd.pth", "closest is iresnet50", "1 with another shape such as fc.weight"
    )


def test_unknown_architecture_is_refused_before_reading(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="known architectures: iresnet18") as raised:
        load_backbone(tmp_path / "absent.pth", "resnet9000")
    assert not isinstance(raised.value, CheckpointError)


def pickled_code_files(directory: Path, marker: Path) -> dict[str, Path]:
    hostile = RunsShellCommand(f"touch {shlex.quote(str(marker))}")
    files = {
        "torch-zip": directory / "hostile.pth",
        "pickle-protocol-2": directory / "hostile2.pkl",
        "pickle-protocol-5": directory / "hostile5.pkl",
    }
    torch.save({"epoch": 1, "arch": "iresnet18", "state_dict": {"conv1.weight": hostile}}, files["torch-zip"])
    files["pickle-protocol-2"].write_bytes(pickle.dumps({"state_dict": hostile}, protocol=2))
    files["pickle-protocol-5"].write_bytes(pickle.dumps(hostile, protocol=5))
    return files


@pytest.mark.parametrize("kind", ["torch-zip", "pickle-protocol-2", "pickle-protocol-5"])
def test_pickled_code_is_refused_without_running(kind: str, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = pickled_code_files(tmp_path, marker)[kind]
    with pytest.raises(CheckpointError) as raised:
        load_backbone(path)
    assert not marker.exists()
    assert_one_sentence(raised.value, path.name)
    if kind != "pickle-protocol-5":  # a bare protocol-5 pickle is refused on its framing already
        assert_one_sentence(raised.value, "pickled code", "system", "without running it")


def test_the_hostile_payload_is_live(tmp_path: Path) -> None:
    """Control for the test above: an unguarded load of the same file does run the code."""
    marker = tmp_path / "code-ran"
    path = pickled_code_files(tmp_path, marker)["pickle-protocol-2"]
    pickle.loads(path.read_bytes())
    assert marker.exists()


def write_garbage(path: Path, mobilefacenet_checkpoint: Path) -> None:
    written = {
        "noise.bin": lambda: np.random.default_rng(0).bytes(4096),
        "pairs.json": lambda: json.dumps([{"image1": "a.png", "image2": "b.png", "label": 1}]).encode(),
        "empty.pt": lambda: b"",
        "truncated.pt": lambda: mobilefacenet_checkpoint.read_bytes()[:100_000],
    }
    saved = {
        "tensor.pt": torch.zeros(3),
        "list.pt": [torch.zeros(3)],
        "settings.pt": {"lr": 0.1, "epochs": 3},
        "empty-state.pt": {"epoch": 1, "state_dict": {}},
        "namespace.pt": {"args": argparse.Namespace(lr=0.1), "state_dict": {}},
    }
    if path.name in written:
        path.write_bytes(written[path.name]())
    else:
        torch.save(saved[path.name], path)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("noise.bin", "is not a PyTorch checkpoint"),
        ("pairs.json", "is not a PyTorch checkpoint"),
        ("empty.pt", "is empty"),
        ("truncated.pt", "is not a readable PyTorch checkpoint"),
        ("tensor.pt", "holds a Tensor, not a state_dict"),
        ("list.pt", "holds a list, not a state_dict"),
        ("settings.pt", "entry 'lr' is not a named tensor"),
        ("empty-state.pt", "holds no tensors"),
        ("namespace.pt", "objects other than tensors (argparse.Namespace)"),
    ],
)
def test_non_checkpoints_are_refused_clearly(
    name: str, reason: str, tmp_path: Path, mobilefacenet_checkpoint: Path
) -> None:
    path = tmp_path / name
    write_garbage(path, mobilefacenet_checkpoint)
    with pytest.raises(CheckpointError) as raised:
        load_backbone(path)
    assert raised.value.suggested_arch is None
    assert_one_sentence(raised.value, name, reason)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"absent\.pth does not exist"):
        read_state_dict(tmp_path / "absent.pth")


def randomised(arch: str) -> torch.nn.Module:
    """A backbone whose running statistics differ from their defaults, so a round trip has to carry them."""
    torch.manual_seed(1)
    model = build_backbone(arch)
    for name, buffer in model.named_buffers():
        if name.endswith("num_batches_tracked"):
            buffer.fill_(7)
        else:
            buffer.uniform_(0.5, 1.5)
    return model


METADATA = {
    "preprocessing": {"channel_order": "BGR", "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "size": 112},
    "threshold": 0.3125,
    "parent_sha256": "ab" * 32,
    "hyperparameters": {
        "epochs": 10,
        "learning_rate": 1e-4,
        "margin": 1.4,
        "freeze_stem": True,
        "note": None,
    },
    "history": [{"epoch": 1, "val_auc": 0.99}],
}


@pytest.mark.parametrize("arch", ["iresnet18", "mobilefacenet"])
def test_save_then_load_round_trips(arch: str, tmp_path: Path) -> None:
    model = randomised(arch)
    path = tmp_path / "models" / f"{arch}.pth"
    digest = save_checkpoint(path, model, arch=arch, epoch=4, metadata=METADATA)
    assert digest == file_digest(path)
    assert sorted(os.listdir(path.parent)) == [path.name]

    loaded = load_backbone(path)
    assert (loaded.arch, loaded.epoch, loaded.sha256) == (arch, 4, digest)
    assert loaded.metadata == {
        "architecture": arch,
        "embedding_size": 512 if arch != "mobilefacenet" else 128,
        **METADATA,
    }
    assert_same_tensors(loaded.model, model.state_dict())

    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"epoch", "arch", "state_dict", "magtune"}
    assert (raw["epoch"], raw["arch"]) == (4, arch)
    prefix = "features.module." if arch.startswith("iresnet") else ""
    assert list(raw["state_dict"]) == [prefix + key for key in model.state_dict()]


def test_a_checkpoint_written_into_a_staged_blob_is_stored_once_under_its_sha256(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    model = randomised("iresnet18")
    with store.staging("checkpoints") as staged:
        write_checkpoint(staged, model, arch="iresnet18", epoch=2, metadata={"threshold": 0.3})
        blob = staged.commit()
    assert [p for p in store.root.rglob("*") if p.is_file()] == [blob.path]
    assert blob.sha256 == file_digest(blob.path) and blob.size == blob.path.stat().st_size
    loaded = load_backbone(blob.path)
    assert (loaded.arch, loaded.epoch, loaded.sha256) == ("iresnet18", 2, blob.sha256)
    assert loaded.metadata["threshold"] == 0.3
    assert_same_tensors(loaded.model, model.state_dict())
    saved = save_checkpoint(
        tmp_path / "same.pth", model, arch="iresnet18", epoch=2, metadata={"threshold": 0.3}
    )
    assert saved == blob.sha256, "the staged blob holds the bytes save_checkpoint writes to a file"


def test_saved_iresnet_keys_are_magface_keys(tmp_path: Path, magface_key_file: Callable[[str], Any]) -> None:
    path = tmp_path / "iresnet18.pth"
    save_checkpoint(path, build_backbone("iresnet18"), arch="iresnet18", epoch=0, metadata={})
    raw = torch.load(path, map_location="cpu", weights_only=True)
    expected = [(key, tuple(shape)) for key, shape in magface_key_file("iresnet18")["keys"]]
    assert [(key, tuple(t.shape)) for key, t in raw["state_dict"].items()] == expected


def test_save_replaces_atomically_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "model.pth"
    first = save_checkpoint(path, randomised("mobilefacenet"), arch="mobilefacenet", epoch=1, metadata={})
    second = save_checkpoint(
        path, build_backbone("mobilefacenet"), arch="mobilefacenet", epoch=2, metadata={}
    )
    assert first != second == file_digest(path)
    assert os.listdir(tmp_path) == ["model.pth"]

    def fails_halfway(payload: Any, stream: Any) -> None:
        stream.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fails_halfway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, randomised("mobilefacenet"), arch="mobilefacenet", epoch=3, metadata={})
    assert os.listdir(tmp_path) == ["model.pth"]
    assert file_digest(path) == second


@pytest.mark.parametrize(
    ("metadata", "complaint"),
    [
        ({"threshold": np.float64(0.5)}, r"metadata\['threshold'\] is a float64"),
        ({"source": Path("/data/x.png")}, "PosixPath"),
        ({"nested": {1: "x"}}, "key 1 that is not a str"),
        ({"architecture": "iresnet50"}, "'iresnet50' but the model is architecture 'iresnet18'"),
    ],
)
def test_save_refuses_metadata_it_could_not_read_back(
    metadata: dict[str, Any], complaint: str, tmp_path: Path
) -> None:
    with pytest.raises((TypeError, ValueError), match=complaint):
        save_checkpoint(
            tmp_path / "m.pth", build_backbone("iresnet18"), arch="iresnet18", epoch=0, metadata=metadata
        )
    assert os.listdir(tmp_path) == []


def test_save_refuses_a_model_of_another_architecture(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model does not fit iresnet34"):
        save_checkpoint(
            tmp_path / "m.pth", build_backbone("iresnet18"), arch="iresnet34", epoch=0, metadata={}
        )
    assert os.listdir(tmp_path) == []


def test_loading_a_checkpoint_in_a_fresh_process_does_not_import_torch_dynamo(
    mobilefacenet_checkpoint: Path,
) -> None:
    """Every job runs in a fresh process: initialising a weightless (meta) build imported torch._dynamo,
    seconds before the job could start, for weights the file replaces anyway."""
    import subprocess
    import sys

    script = (
        "import sys; from worker.ml.checkpoints import load_backbone; "
        f"load_backbone({str(mobilefacenet_checkpoint)!r}, 'mobilefacenet'); "
        "print('torch._dynamo' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
