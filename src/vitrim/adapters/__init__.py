"""Model families: one adapter file each, converting to and from the canonical vitrim ViT.

The pruning, token and quantization code only ever sees the canonical ViT; an adapter converts
a family's model to it exactly and back, keeping the family's own classes and attributes valid.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vitrim.errors import ConfigError
from vitrim.models import VisionTransformer

FAMILIES = ("vitrim", "hf", "timm")


def family_of(model: Any) -> str | None:
    """``"vitrim"``, ``"hf"``, ``"timm"``, or None for a model vitrim does not know."""
    from vitrim.adapters.hf import is_hf_vit
    from vitrim.adapters.timm import is_timm_vit

    if isinstance(model, VisionTransformer):
        return "vitrim"
    if is_hf_vit(model):
        return "hf"
    if is_timm_vit(model):
        return "timm"
    return None


def require_family(model: Any) -> str:
    family = family_of(model)
    if family is None:
        raise ConfigError(f"{type(model).__name__} is not a model vitrim knows; supported: vitrim's "
                          f"VisionTransformer, Hugging Face ViT/DeiT (ViTForImageClassification, ViTModel, "
                          f"DeiTForImageClassification[WithTeacher], DeiTModel) and timm VisionTransformer "
                          f"(vit_*, deit_*)")
    return family


def to_canonical(model: nn.Module) -> VisionTransformer:
    family = require_family(model)
    if family == "hf":
        from vitrim.adapters.hf import to_canonical as convert
    elif family == "timm":
        from vitrim.adapters.timm import to_canonical as convert
    else:
        return model
    return convert(model)


def metadata(model: nn.Module) -> dict[str, Any]:
    """What ``from_canonical`` needs to rebuild the family's model (JSON-serialisable)."""
    family = require_family(model)
    if family == "hf":
        from vitrim.adapters.hf import hf_metadata

        return {"family": "hf", **hf_metadata(model)}
    if family == "timm":
        from vitrim.adapters.timm import timm_metadata

        return {"family": "timm", **timm_metadata(model)}
    return {"family": "vitrim"}


def from_canonical(canonical: VisionTransformer, meta: dict[str, Any]) -> nn.Module:
    family = meta.get("family", "vitrim")
    if family == "hf":
        from vitrim.adapters.hf import from_canonical as rebuild

        return rebuild(canonical, meta["hf_class"], meta["hf_config"])
    if family == "timm":
        from vitrim.adapters.timm import from_canonical as rebuild

        return rebuild(canonical, meta["timm_class"], meta["timm_global_pool"], meta["timm_num_classes"])
    if family == "vitrim":
        return canonical
    raise ConfigError(f"unknown model family {family!r} ({', '.join(FAMILIES)})")
