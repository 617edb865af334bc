"""The small public API: create, load, save."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from vitrim.adapters.sources import create, load_model
from vitrim.io import save


def load(path_or_name: str | Path, pretrained: bool = False) -> nn.Module:
    """Load a model in its own family.

    * a vitrim model directory (``vitrim.save``): a vitrim ViT, or the Hugging Face / timm class
      it was saved from (e.g. a pruned ``ViTForImageClassification``);
    * a Hugging Face ViT/DeiT, DINOv2, CLIP or SigLIP vision directory (``save_pretrained``), or ``"hf:DIR"``;
    * ``"timm:NAME"`` (e.g. ``"timm:deit_small_patch16_224"``): timm's model, random weights unless
      ``pretrained=True`` (which needs the network or timm's local cache);
    * a preset that ships trained weights (e.g. ``"fmnist-vit"``).
    """
    return load_model(path_or_name, pretrained=pretrained).model


__all__ = ["create", "load", "save"]
