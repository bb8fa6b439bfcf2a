"""Batched inference: unit-length embeddings plus the raw norm, MagFace's quality score."""

from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.ml.preprocessing import PreprocessSpec, to_model_input


@dataclass
class EmbeddingResult:
    embeddings: Tensor  # float32 [N, D], unit length, on the CPU
    norms: Tensor  # float32 [N], the norm before normalisation


def select_device(prefer: str | None = None) -> torch.device:
    """The GPU when there is one, else the CPU; `prefer` ("cpu", "cuda", "cuda:1") overrides."""
    if prefer:
        device = torch.device(prefer)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {prefer!r} was asked for but CUDA is not available")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def autocast_for(device: torch.device) -> torch.autocast | nullcontext:
    """bf16 autocast on CUDA (no loss scaling needed, unlike fp16); plain fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def batches(count: int, batch_size: int) -> Iterator[slice]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, count, batch_size):
        yield slice(start, min(start + batch_size, count))


def embed_pixels(
    model: nn.Module,
    spec: PreprocessSpec,
    pixels: Tensor,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> EmbeddingResult:
    """Embed uint8 RGB crops [N, 3, H, W] with the model in eval mode.

    `device` None runs where the model already is; a device moves the model there. The model's train/eval mode
    is restored afterwards, so a caller in the middle of something else is not disturbed.
    """
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"expected pixels [N, 3, H, W], got shape {tuple(pixels.shape)}")
    target = torch.device(device) if device is not None else model_device(model)
    model.to(target)
    was_training = model.training
    model.eval()
    embeddings: list[Tensor] = []
    norms: list[Tensor] = []
    try:
        with torch.inference_mode():
            for part in batches(pixels.shape[0], batch_size):
                inputs = to_model_input(pixels[part].to(target, non_blocking=True), spec)
                with autocast_for(target):
                    raw = model(inputs)
                raw = raw.float().flatten(1)
                norms.append(torch.linalg.vector_norm(raw, dim=1).cpu())
                embeddings.append(F.normalize(raw, dim=1).cpu())
    finally:
        model.train(was_training)
    if not embeddings:
        return EmbeddingResult(torch.empty(0, 0), torch.empty(0))
    return EmbeddingResult(torch.cat(embeddings), torch.cat(norms))
