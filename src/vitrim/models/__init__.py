"""Models: the canonical ViT with per-block dimensions and its named presets."""

from vitrim.models.config import BlockDims, ViTConfig, uniform_config
from vitrim.models.vit import VisionTransformer

__all__ = ["BlockDims", "ViTConfig", "VisionTransformer", "uniform_config"]
from vitrim.models.registry import PRESETS, Preset, get_preset, register  # noqa: E402

__all__ += ["PRESETS", "Preset", "get_preset", "register"]
