"""Random calibration images for models no local dataset fits (speed checks, not accuracy)."""

from __future__ import annotations

import torch

from vitrim.data.dataset import ImageSet
from vitrim.models import VisionTransformer


@torch.no_grad()
def pseudo_labelled(model: VisionTransformer, count: int, seed: int = 0, batch_size: int = 16) -> ImageSet:
    """``count`` uniform random images at ``model``'s input shape, labelled by ``model``'s own predictions.

    Random weights or random images have no true labels; the model's argmax gives the loss-based
    saliency something to keep, and accuracy against these labels only measures agreement.
    """
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, cfg.in_chans, cfg.image_size, cfg.image_size), generator=g,
                           dtype=torch.uint8)  # (N, C, S, S)
    names = list(cfg.class_names) if cfg.class_names else [str(i) for i in range(cfg.num_classes)]
    unlabelled = ImageSet(images, torch.zeros(count, dtype=torch.long), names, cfg.mean, cfg.std, "random images")
    model.eval()
    labels = torch.cat([model(x).argmax(-1) for x, _ in unlabelled.batches(batch_size)])  # (N,)
    return ImageSet(images, labels, names, cfg.mean, cfg.std, "random images")
