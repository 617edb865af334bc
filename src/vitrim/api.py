"""The small public API: create, load, save, measure, evaluate."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vitrim.io import save
from vitrim.models import ViTConfig, VisionTransformer, get_preset


def create(name_or_config: str | ViTConfig, seed: int | None = None) -> VisionTransformer:
    """A randomly initialised model from a preset name or a :class:`ViTConfig`."""
    cfg = get_preset(name_or_config).build() if isinstance(name_or_config, str) else name_or_config
    if seed is not None:
        torch.manual_seed(seed)
    return VisionTransformer(cfg).eval()


def load(path_or_name: str | Path, pretrained: bool = False) -> nn.Module:
    """Load a model in its own family.

    * a vitrim model directory (``vitrim.save``): a vitrim ViT, or the Hugging Face / timm class
      it was saved from (e.g. a pruned ``ViTForImageClassification``);
    * a Hugging Face ViT/DeiT directory (``save_pretrained``), or ``"hf:DIR"``;
    * ``"timm:NAME"`` (e.g. ``"timm:deit_small_patch16_224"``): timm's model, random weights unless
      ``pretrained=True`` (which needs the network or timm's local cache);
    * a preset that ships trained weights (e.g. ``"fmnist-vit"``).
    """
    from vitrim.adapters.sources import load_model

    return load_model(path_or_name, pretrained=pretrained).model


__all__ = ["create", "load", "save"]
