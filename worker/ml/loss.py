"""Contrastive loss on L2-normalised embeddings.

The distance is taken between unit vectors so that the loss only shapes the angle between embeddings: MagFace
keeps quality in the norm, and the service compares faces by cosine. On the unit sphere D² = 2 − 2·cos, so a
margin m pushes negatives to cos ≤ 1 − m²/2 (m = 1.0 → 0.5, m = 1.4 → 0.02).
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def contrastive_loss(emb_a: Tensor, emb_b: Tensor, labels: Tensor, margin: float) -> Tensor:
    """Mean over pairs of y·D² + (1−y)·max(0, margin − D)², y = 1 for the same person.

    Computed in float32 whatever the inputs' dtype (bf16 autocast leaves them in bf16). D's square root is
    guarded so that a negative pair of identical embeddings gets a finite gradient.
    """
    if emb_a.shape != emb_b.shape or emb_a.ndim != 2:
        raise ValueError(
            f"expected two [P, D] embedding batches, got {tuple(emb_a.shape)} and {tuple(emb_b.shape)}"
        )
    if labels.shape != emb_a.shape[:1]:
        raise ValueError(f"expected {emb_a.shape[0]} labels, got shape {tuple(labels.shape)}")
    a = F.normalize(emb_a.float(), dim=1)
    b = F.normalize(emb_b.float(), dim=1)
    y = labels.to(device=a.device, dtype=torch.float32)
    squared = (a - b).pow(2).sum(dim=1)
    distance = torch.where(squared > 0, squared.clamp_min(1e-12).sqrt(), torch.zeros_like(squared))
    negative = (margin - distance).clamp_min(0.0).pow(2)
    return (y * squared + (1.0 - y) * negative).mean()


def contrastive_loss_from_cosine(cosine: Tensor, labels: Tensor, margin: float) -> Tensor:
    """The same loss from pair cosines, using D² = 2 − 2·cos between unit vectors (for scored pairs)."""
    squared = (2.0 - 2.0 * cosine.double()).clamp_min(0.0)
    y = labels.to(squared.dtype)
    negative = (margin - squared.sqrt()).clamp_min(0.0).pow(2)
    return (y * squared + (1.0 - y) * negative).mean()
