"""Checkpoint factories: MagFace-layout checkpoints built from the key lists in shared/magface."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

Shape = tuple[int, ...]
KeyList = list[tuple[str, Shape]]

# Blocks per stage as MagFace defines them; iresnet34 has no key file and is derived from the others' pattern.
IRESNET_BLOCKS = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
}
KEY_FILE_ARCHS = ("iresnet18", "iresnet50", "iresnet100")
HEAD_CLASSES = 10  # the real heads have ~85k classes; the size is irrelevant to loading


def derive_iresnet_keys(template: KeyList, blocks: tuple[int, int, int, int]) -> KeyList:
    """Repeat a key list's stage pattern (first block with downsample, then plain blocks) to new depths."""
    layer_keys = [i for i, (key, _) in enumerate(template) if key.startswith("layer")]
    stem, head = template[: layer_keys[0]], template[layer_keys[-1] + 1 :]
    keys = list(stem)
    for stage, count in enumerate(blocks, start=1):
        keys += [(k, s) for k, s in template if k.startswith(f"layer{stage}.0.")]
        plain = [(k, s) for k, s in template if k.startswith(f"layer{stage}.1.")]
        for block in range(1, count):
            keys += [(k.replace(f"layer{stage}.1.", f"layer{stage}.{block}.", 1), s) for k, s in plain]
    return keys + list(head)


@pytest.fixture(scope="session")
def magface_key_file(shared_dir: Path) -> Callable[[str], dict[str, Any]]:
    """The parsed shared/magface/keys_<arch>.json."""
    loaded: dict[str, dict[str, Any]] = {}

    def read(arch: str) -> dict[str, Any]:
        if arch not in loaded:
            loaded[arch] = json.loads((shared_dir / "magface" / f"keys_{arch}.json").read_text())
        return loaded[arch]

    return read


@pytest.fixture(scope="session")
def magface_keys(magface_key_file: Callable[[str], dict[str, Any]]) -> Callable[[str], KeyList]:
    """Bare backbone keys and shapes of a MagFace iResNet, in checkpoint order."""

    def keys(arch: str) -> KeyList:
        if arch not in KEY_FILE_ARCHS:
            return derive_iresnet_keys(keys("iresnet18"), IRESNET_BLOCKS[arch])
        key_file = magface_key_file(arch)
        prefix = key_file["key_prefix"]
        return [(key.removeprefix(prefix), tuple(shape)) for key, shape in key_file["keys"]]

    return keys


@pytest.fixture(scope="module")
def random_backbone(magface_keys: Callable[[str], KeyList]) -> Callable[[str], dict[str, torch.Tensor]]:
    """Random tensors of a MagFace backbone's keys and shapes (bare keys); built once per test module."""
    built: dict[str, dict[str, torch.Tensor]] = {}

    def tensors(arch: str) -> dict[str, torch.Tensor]:
        if arch not in built:
            generator = torch.Generator().manual_seed(len(arch))
            built[arch] = {
                key: torch.zeros((), dtype=torch.int64)
                if key.endswith("num_batches_tracked")
                else torch.randn(shape, generator=generator)
                for key, shape in magface_keys(arch)
            }
        return built[arch]

    return tensors


def magface_layout(
    tensors: dict[str, torch.Tensor], *, prefix: str, head: bool = True, wrapped: bool = True, arch: str = ""
) -> dict[str, Any]:
    """What MagFace's trainers save: prefixed backbone keys, the head beside them, optionally wrapped."""
    state_dict: dict[str, Any] = {prefix + key: tensor for key, tensor in tensors.items()}
    if head and prefix == "features.module.":
        state_dict["parallel_fc.weight"] = torch.randn(HEAD_CLASSES, 512)
    elif head and prefix == "module.features.":
        state_dict["module.fc.weight"] = torch.randn(512, HEAD_CLASSES)
    if not wrapped:
        return state_dict
    return {"epoch": 25, "arch": arch, "state_dict": state_dict}


@pytest.fixture
def write_checkpoint(tmp_path: Path) -> Callable[..., Path]:
    """torch.save an object into tmp_path under the given file name."""

    def write(name: str, payload: Any) -> Path:
        path = tmp_path / name
        torch.save(payload, path)
        return path

    return write
