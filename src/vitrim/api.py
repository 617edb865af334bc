"""The small public API: create, load, save, measure, evaluate."""

from __future__ import annotations

from pathlib import Path

import torch

from vitrim.errors import UnknownModelError
from vitrim.io import load_dir, save
from vitrim.models import ViTConfig, VisionTransformer, get_preset


def create(name_or_config: str | ViTConfig, seed: int | None = None) -> VisionTransformer:
    """A randomly initialised model from a preset name or a :class:`ViTConfig`."""
    cfg = get_preset(name_or_config).build() if isinstance(name_or_config, str) else name_or_config
    if seed is not None:
        torch.manual_seed(seed)
    return VisionTransformer(cfg).eval()


def load(path_or_name: str | Path) -> VisionTransformer:
    """Load a model directory, or a preset that ships trained weights (e.g. ``"fmnist-vit"``)."""
    path = Path(path_or_name)
    if path.is_dir():
        return load_dir(path)
    name = str(path_or_name)
    preset = get_preset(name)
    weights = preset.weights_dir()
    if weights is None:
        raise UnknownModelError(
            f"preset {name!r} has no trained weights; use vitrim.create({name!r}) for a randomly "
            f"initialised model, or train one with `vitrim train --model {name}`"
        )
    return load_dir(weights)


__all__ = ["create", "load", "save"]
