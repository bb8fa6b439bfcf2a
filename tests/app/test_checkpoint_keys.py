"""The torch-free key reader: shapes without tensor data, MagFace's layouts, and nothing run from the file.

Checkpoints are written with torch here; the reader itself never imports it.
"""

import collections
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from app.models.checkpoint_keys import (
    KeysUnreadable,
    architecture_table,
    checkpoint_shapes,
    compare,
    fitting_arch,
    raw_tensor_shapes,
)
from tests.app.checkpoint_files import RunsAShellCommand
from worker.ml.checkpoints import read_state_dict


def weights(arch: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """`arch`'s shapes, each a random value expanded, so the files stay small."""
    return {
        prefix + key: torch.tensor(0) if not shape else torch.randn(1).expand(shape)
        for key, shape in architecture_table()[arch].items()
    }


def write(tmp_path: Path, obj: object, *, legacy: bool = False) -> Path:
    path = tmp_path / "checkpoint.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def test_the_shared_mobilefacenet_checkpoint_fits_mobilefacenet(mobilefacenet_checkpoint: Path) -> None:
    shapes = checkpoint_shapes(mobilefacenet_checkpoint)

    assert shapes == architecture_table()["mobilefacenet"]
    assert fitting_arch(shapes) == "mobilefacenet"
    assert not compare(shapes, "iresnet18").exact


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_shapes_are_read_without_the_tensor_data(tmp_path: Path, legacy: bool) -> None:
    stored = {
        "weight": torch.zeros(7, 3, 5),
        "view": torch.arange(24.0).reshape(4, 6)[1:, ::2],
        "parameter": torch.nn.Parameter(torch.ones(2, 2)),
        "count": torch.tensor(5),
        "half": torch.zeros(3, dtype=torch.float16),
    }
    path = write(tmp_path, collections.OrderedDict(stored), legacy=legacy)

    assert raw_tensor_shapes(path) == {key: tuple(value.shape) for key, value in stored.items()}


@pytest.mark.parametrize(
    ("arch", "prefix", "head"),
    [
        ("iresnet18", "features.module.", "parallel_fc.weight"),
        ("iresnet50", "module.features.", "module.fc.weight"),
        ("iresnet18", "module.", None),
        ("iresnet34", "", None),
        ("mobilefacenet", "module.", None),
        ("mobilefacenet", "", None),
    ],
)
@pytest.mark.parametrize("wrapped", [True, False], ids=["magface-dict", "bare"])
def test_keys_are_read_as_the_worker_reads_them(
    tmp_path: Path, arch: str, prefix: str, head: str | None, wrapped: bool
) -> None:
    state = weights(arch, prefix)
    if head is not None:
        state[head] = torch.zeros(512, 10)
    path = write(tmp_path, {"epoch": 3, "arch": arch, "state_dict": state} if wrapped else state)

    shapes = checkpoint_shapes(path)
    worker_state, _metadata = read_state_dict(path)

    assert shapes == {key: tuple(tensor.shape) for key, tensor in worker_state.items()}
    assert fitting_arch(shapes) == arch


def test_a_misfit_is_described_by_what_differs(tmp_path: Path) -> None:
    state = weights("iresnet18")
    state["fc.weight"] = torch.zeros(128, 25088)
    del state["bn1.weight"]
    state["extra.weight"] = torch.zeros(1)

    fit = compare(checkpoint_shapes(write(tmp_path, state)), "iresnet18")

    assert (fit.expected, fit.found) == (187, 187)
    assert (fit.missing, fit.unexpected, fit.reshaped) == (["bn1.weight"], ["extra.weight"], ["fc.weight"])
    assert fit.describe() == (
        "187 tensors expected, 187 found; 1 missing such as bn1.weight, 1 unexpected such as extra.weight, "
        "1 with another shape such as fc.weight"
    )


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_a_global_outside_the_allowlist_is_never_called(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "crafted.pt"
    payload = pickle.dumps({"state_dict": {}, "x": RunsAShellCommand(marker)}, protocol=protocol)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)

    with pytest.raises(KeysUnreadable, match="not an allowed global"):
        raw_tensor_shapes(path)
    assert not marker.exists()


def test_a_length_for_bytearray_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "crafted.pt"
    payload = b"\x80\x02c__builtin__\nbytearray\nJ\x00\x00\x00\x7f\x85R."  # bytearray(2**31 - 2**24)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)

    with pytest.raises(KeysUnreadable, match="a bytearray built from a length"):
        raw_tensor_shapes(path)


@pytest.mark.parametrize(
    "content",
    [
        {"state_dict": {"w": torch.zeros(2), "note": "text"}},
        {"state_dict": {}},
        [torch.zeros(2)],
        {"w": [1.0, 2.0]},
    ],
    ids=["non-tensor-entry", "empty", "list", "no-tensors"],
)
def test_anything_but_a_dict_of_named_tensors_is_left_to_the_worker(tmp_path: Path, content: object) -> None:
    with pytest.raises(KeysUnreadable):
        checkpoint_shapes(write(tmp_path, content))


def test_a_file_that_is_no_checkpoint_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}))

    with pytest.raises(KeysUnreadable):
        raw_tensor_shapes(path)
