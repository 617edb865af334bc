"""A trained ViT at another input size: same weights, position embeddings resampled to the new grid.

Serves the 197-token reference (``fmnist-vit`` on 28x28 images upsampled to 56x56: 14x14 patches
of 4 plus the class token, DeiT's token count) and any model fine-tuned at a new resolution. The
patch size stays, so the patch embedding is exact; only the position embedding's patch rows are
resized (bicubic, as DINOv2 and FlexiViT do), prefix rows kept.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from vitrim.errors import ConfigError
from vitrim.models.vit import VisionTransformer


@torch.no_grad()
def with_image_size(model: VisionTransformer, image_size: int) -> VisionTransformer:
    """A copy of ``model`` for ``image_size`` x ``image_size`` inputs (a multiple of the patch size),
    its position embedding stored for the new grid; ``model`` is not changed."""
    cfg = model.config
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < cfg.patch_size:
        raise ConfigError(f"image size must be an integer of at least the patch size {cfg.patch_size}, "
                          f"got {image_size!r}")
    if image_size % cfg.patch_size:
        raise ConfigError(f"image size {image_size} is not a multiple of the patch size {cfg.patch_size}; "
                          f"use {image_size // cfg.patch_size * cfg.patch_size} or "
                          f"{(image_size // cfg.patch_size + 1) * cfg.patch_size}")
    source = copy.deepcopy(model).eval()
    target_cfg = cfg.replace(image_size=image_size, pos_embed_grid=None)
    # the source resamples its stored grid to the target grid when it is told the target size
    resampler = VisionTransformer(cfg.replace(image_size=image_size, pos_embed_grid=cfg.stored_grid))
    resampler.pos_embed.copy_(source.pos_embed)
    resized = VisionTransformer(target_cfg)
    state = source.state_dict()
    state["pos_embed"] = resampler.position_embedding().detach().clone()
    resized.load_state_dict(state, strict=True)
    resized.token_reduction = model.token_reduction
    return resized.train(model.training)


class InputResized(nn.Module):
    """``model`` fed images resized to its own input size first: a teacher trained at 28x28
    distilling a student that sees 56x56 (bilinear, antialiased when shrinking)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, in, H', W') -> the model's output
        size = self.config.image_size
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                                   antialias=images.shape[-1] > size)
        return self.model(images)
