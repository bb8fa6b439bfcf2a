"""The backbones reproduce MagFace's iResNets key for key and the shared MobileFaceNet file exactly."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tests.worker.ml.magface import IRESNET_BLOCKS, KEY_FILE_ARCHS, KeyList, derive_iresnet_keys
from worker.ml.backbones import ARCHITECTURES, build_backbone, embedding_size

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def model_keys(model: nn.Module) -> KeyList:
    return [(key, tuple(tensor.shape)) for key, tensor in model.state_dict().items()]


def test_architectures_and_embedding_sizes() -> None:
    assert ARCHITECTURES == ("iresnet18", "iresnet34", "iresnet50", "iresnet100", "mobilefacenet")
    assert [embedding_size(arch) for arch in ARCHITECTURES] == [512, 512, 512, 512, 128]


@pytest.mark.parametrize("call", [build_backbone, embedding_size])
def test_unknown_architecture_names_the_known_ones(call: Callable[[str], Any]) -> None:
    with pytest.raises(ValueError, match="resnet9000") as raised:
        call("resnet9000")
    assert all(arch in str(raised.value) for arch in ARCHITECTURES)


def test_importing_the_registry_builds_nothing() -> None:
    code = (
        "import sys, worker.ml.backbones as b; "
        "print(b.embedding_size('iresnet50'), *(f'worker.ml.backbones.{m}' in sys.modules "
        "for m in ('iresnet', 'mobilefacenet')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["512", "False", "False"]


@pytest.mark.parametrize("arch", KEY_FILE_ARCHS)
def test_iresnet_matches_magface_key_file(
    arch: str,
    magface_keys: Callable[[str], KeyList],
    magface_key_file: Callable[[str], dict[str, Any]],
) -> None:
    with torch.device("meta"):
        model = build_backbone(arch)
    key_file = magface_key_file(arch)
    assert model_keys(model) == magface_keys(arch)
    assert sum(p.numel() for p in model.parameters()) == key_file["params"]
    assert sum(b.numel() for b in model.buffers()) == key_file["buffer_elements"]
    tracked = [k for k, _ in model_keys(model) if k.endswith("num_batches_tracked")]
    assert len(tracked) == key_file["num_num_batches_tracked"]


@pytest.mark.parametrize("arch", ["iresnet50", "iresnet100"])
def test_key_derivation_reproduces_the_key_files(arch: str, magface_keys: Callable[[str], KeyList]) -> None:
    """The rule used for iresnet34 (which has no key file) rebuilds the deeper files from iresnet18's."""
    assert derive_iresnet_keys(magface_keys("iresnet18"), IRESNET_BLOCKS[arch]) == magface_keys(arch)


def test_iresnet34_follows_the_magface_pattern(magface_keys: Callable[[str], KeyList]) -> None:
    with torch.device("meta"):
        model = build_backbone("iresnet34")
    expected = magface_keys("iresnet34")
    assert model_keys(model) == expected
    assert sum(k.startswith("layer3.") and k.endswith(".bn1.weight") for k, _ in expected) == 6


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a.startswith("iresnet")])
def test_iresnet_uses_magface_batchnorm_and_head(arch: str) -> None:
    with torch.device("meta"):
        model = build_backbone(arch)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    assert norms and all(m.eps == 2e-5 and m.momentum == 0.9 for m in norms)
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.4]
    assert isinstance(model.features, nn.BatchNorm1d)
    assert (model.fc.in_features, model.fc.out_features) == (25088, 512)
    assert sum(isinstance(m, nn.PReLU) for m in model.modules()) == 1 + sum(IRESNET_BLOCKS[arch])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_forward_gives_one_embedding_per_face(arch: str) -> None:
    torch.manual_seed(0)
    model = build_backbone(arch).eval()
    with torch.inference_mode():
        out = model(torch.rand(2, 3, 112, 112))
    assert out.shape == (2, embedding_size(arch))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])


def test_mobilefacenet_loads_the_shared_file_strictly(mobilefacenet_checkpoint: Path) -> None:
    state_dict = torch.load(mobilefacenet_checkpoint, map_location="cpu", weights_only=True)
    model = build_backbone("mobilefacenet")
    assert len(state_dict) == 307
    assert model_keys(model) == [(key, tuple(tensor.shape)) for key, tensor in state_dict.items()]
    model.load_state_dict(state_dict, strict=True)


def test_mobilefacenet_separates_real_faces(mobilefacenet_checkpoint: Path, johns_dir: Path) -> None:
    """A network with a wrong layer would still load; only embeddings of real faces show it computes right."""
    model = build_backbone("mobilefacenet")
    model.load_state_dict(torch.load(mobilefacenet_checkpoint, map_location="cpu", weights_only=True))
    paths = sorted((johns_dir / "aligned_112").glob("*/*.png"))
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    assert images.shape == (55, 3, 112, 112)
    with torch.inference_mode():
        embeddings = model.eval()((images - IMAGENET_MEAN) / IMAGENET_STD)
    assert embeddings.shape == (55, 128)
    unit = nn.functional.normalize(embeddings, dim=1)
    first, second = torch.triu_indices(len(paths), len(paths), offset=1)
    scores = (unit[first] * unit[second]).sum(dim=1)
    same = torch.tensor([paths[i].parent == paths[j].parent for i, j in zip(first, second, strict=True)])
    positives, negatives = scores[same], scores[~same]
    assert (len(positives), len(negatives)) == (275, 1210)
    auc = (positives[:, None] > negatives[None, :]).float().mean().item()
    assert auc > 0.95
    assert negatives.mean() < 0.3 < positives.mean()
