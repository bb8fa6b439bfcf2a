"""MagFace's checkpoint layouts, so tests can build checkpoints like its trainers save without its code."""

from __future__ import annotations

from typing import Any

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
