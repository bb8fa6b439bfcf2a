"""Face-embedding backbones chosen by name.

The network modules are imported on first use, so reading the list of architectures costs nothing.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from app.domain import Architecture

if TYPE_CHECKING:
    from torch import nn

# Plain strings, in declaration order: they name modules' builders and appear in messages as they are.
ARCHITECTURES: tuple[str, ...] = tuple(arch.value for arch in Architecture)

_EMBEDDING_SIZES = {
    Architecture.IRESNET18: 512,
    Architecture.IRESNET34: 512,
    Architecture.IRESNET50: 512,
    Architecture.IRESNET100: 512,
    Architecture.MOBILEFACENET: 128,
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
