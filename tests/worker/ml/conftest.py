"""Checkpoint fixtures: MagFace key lists from shared/magface, random backbones of them, checkpoint files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.worker.ml.magface import IRESNET_BLOCKS, KEY_FILE_ARCHS, KeyList, derive_iresnet_keys


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


@pytest.fixture
def write_checkpoint(tmp_path: Path) -> Callable[..., Path]:
    """torch.save an object into tmp_path under the given file name."""

    def write(name: str, payload: Any) -> Path:
        path = tmp_path / name
        torch.save(payload, path)
        return path

    return write
