"""One fine-tuning step's loss, and which parameters a fine-tune may move."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.ml.embedding import autocast_for
from worker.ml.loss import contrastive_loss
from worker.ml.preprocessing import PreprocessSpec, to_model_input

# Top-level modules before the first stage, by architecture family: iResNet (conv1, bn1, prelu) and
# MobileFaceNet (conv1, dw_conv).
STEM_MODULES = ("conv1", "bn1", "prelu", "dw_conv")


def distinct_image_loss(
    model: nn.Module,
    spec: PreprocessSpec,
    pixels: Tensor,
    first: Tensor,
    second: Tensor,
    labels: Tensor,
    margin: float,
    *,
    anchors: Tensor | None = None,
    anchor_weight: float = 0.0,
) -> Tensor:
    """Contrastive loss of a batch of pairs, forwarding each distinct image of the batch once.

    Valid because BatchNorm and dropout are in eval mode: an image's embedding does not depend on what else is
    in its batch, so scoring every pair from one embedding per image gives the same loss and gradients as
    forwarding both images of every pair. `pixels` is the uint8 stack the indices point into, on the device.

    With `anchors` (the parent model's unit embeddings of the same stack), each distinct image is also pulled
    towards where the parent put it, `anchor_weight`·mean ‖ê − ê_parent‖²: distillation against forgetting.
    """
    count = first.shape[0]
    images, inverse = torch.unique(torch.cat([first, second]), return_inverse=True)
    inputs = to_model_input(pixels[images.to(pixels.device)], spec)
    with autocast_for(inputs.device):
        embeddings = model(inputs).flatten(1)
    inverse = inverse.to(embeddings.device)
    loss = contrastive_loss(embeddings[inverse[:count]], embeddings[inverse[count:]], labels, margin)
    if anchors is not None and anchor_weight > 0:
        drift = F.normalize(embeddings.float(), dim=1) - anchors[images.to(anchors.device)]
        loss = loss + anchor_weight * drift.pow(2).sum(dim=1).mean()
    return loss


def stem_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the network's stem: it sees raw pixels and is the first thing a fine-tune may spare."""
    found = [
        parameter
        for name, child in model.named_children()
        if name in STEM_MODULES
        for parameter in child.parameters()
    ]
    if not found:
        raise ValueError(f"no stem ({', '.join(STEM_MODULES)}) found in {type(model).__name__}")
    return found
