"""Model families: one adapter file each, converting to and from the canonical vitrim ViT.

The pruning, token and quantization code only ever sees the canonical ViT; an adapter converts
a family's model to it exactly and back, keeping the family's own classes and attributes valid.
Model specs (``hf:DIR``, ``timm:NAME``, directories, presets) are resolved in :mod:`.sources`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vitrim.errors import ConfigError
from vitrim.models import VisionTransformer

FAMILIES = ("vitrim", "hf", "timm")
SUPPORTED_TEXT = ("vitrim's VisionTransformer (model directories and presets), Hugging Face ViT/DeiT "
                  "(ViTForImageClassification, ViTModel, DeiTForImageClassification[WithTeacher], DeiTModel; "
                  "a save_pretrained directory or hf:DIR) and timm VisionTransformer (timm:vit_*, timm:deit_*)")


def unsupported(what: str) -> ConfigError:
    """The error for a model vitrim cannot convert, naming the families it supports."""
    return ConfigError(f"{what} is not a model vitrim knows; supported: {SUPPORTED_TEXT}")


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
    """The model's family; a :class:`ConfigError` listing the supported families if it has none."""
    family = family_of(model)
    if family is None:
        raise unsupported(type(model).__name__)
    return family


def head_kind(model: nn.Module) -> str:
    """``"classifier"``, ``"pooler"`` (HF's dense+tanh on the class token) or ``"none"`` (a backbone)."""
    family = require_family(model)
    if family == "hf":
        from vitrim.adapters.hf import head_kind as kind

        return kind(model)
    if family == "timm":
        return "classifier" if isinstance(model.head, nn.Linear) else "none"
    return "classifier"


def to_canonical(model: nn.Module) -> VisionTransformer:
    """The exactly equivalent canonical ViT (a copy; a vitrim model is returned as it is)."""
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
    """The family's model (named by ``meta``, from :func:`metadata`) carrying ``canonical``'s dims and weights."""
    family = meta.get("family", "vitrim")
    if family == "hf":
        from vitrim.adapters.hf import from_canonical as rebuild

        return rebuild(canonical, meta["hf_class"], meta["hf_config"], pooler=bool(meta.get("hf_pooler", False)))
    if family == "timm":
        from vitrim.adapters.timm import from_canonical as rebuild

        return rebuild(canonical, meta["timm_class"], meta["timm_global_pool"], meta["timm_num_classes"],
                       meta.get("timm_pretrained_cfg"))
    if family == "vitrim":
        return canonical
    raise ConfigError(f"unknown model family {family!r} ({', '.join(FAMILIES)})")
