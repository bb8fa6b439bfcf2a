"""Face-embedding backbones chosen by name.

The network modules are imported on first use, so reading the list of architectures costs nothing.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

ARCHITECTURES: tuple[str, ...] = ("iresnet18", "iresnet34", "iresnet50", "iresnet100", "mobilefacenet")

_EMBEDDING_SIZES = {
    "iresnet18": 512,
    "iresnet34": 512,
    "iresnet50": 512,
    "iresnet100": 512,
    "mobilefacenet": 128,
}


def _check_arch(arch: str) -> None:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known architectures: {', '.join(ARCHITECTURES)}")


def is_iresnet(arch: str) -> bool:
    """iResNets are MagFace's networks: their checkpoints use MagFace's key prefix and BGR input."""
    _check_arch(arch)
    return arch.startswith("iresnet")


def build_backbone(arch: str) -> nn.Module:
    """A freshly initialised backbone (in train mode, on the current default device)."""
    _check_arch(arch)
    module = import_module(f"{__name__}.{'iresnet' if is_iresnet(arch) else 'mobilefacenet'}")
    return getattr(module, arch)()


def embedding_size(arch: str) -> int:
    _check_arch(arch)
    return _EMBEDDING_SIZES[arch]
