"""Model families: one adapter file each, converting to and from the canonical vitrim ViT.

The pruning, token and quantization code only ever sees the canonical ViT; an adapter converts
a family's model to it exactly and back, keeping the family's own classes and attributes valid.
Model specs (``hf:DIR``, ``timm:NAME``, directories, presets) are resolved in :mod:`.sources`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vitrim.errors import ConfigError, ModelFileError
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


# What each family's metadata holds: key -> (accepted types, required).
FAMILY_KEYS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "hf": {"hf_class": ((str,), True), "hf_config": ((dict,), True), "hf_pooler": ((bool,), False)},
    "timm": {"timm_class": ((str,), True), "timm_global_pool": ((str,), True),
             "timm_num_classes": ((int, type(None)), True), "timm_pretrained_cfg": ((dict, type(None)), False)},
}


def check_family_metadata(meta: dict[str, Any], num_classes: int) -> None:
    """A :class:`ModelFileError` unless ``meta`` holds what its family needs to rebuild the model.

    ``num_classes`` is the canonical model's; a timm model's own class count must be it, or 0 for
    a backbone.
    """
    family = meta.get("family", "vitrim")
    fix = "re-save the model with vitrim.save, which records the family's class and config"
    for key, (types, required) in FAMILY_KEYS.get(family, {}).items():
        if key not in meta:
            if required:
                raise ModelFileError(f"the model config names family {family!r} but has no {key!r}; {fix}")
            continue
        value = meta[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ModelFileError(f"the model config's {key!r} must be {expected}, got {value!r}; {fix}")
    if family == "hf":
        from vitrim.adapters.hf_dir import check_hf_config

        check_hf_config(meta["hf_config"], "the model config's \"hf_config\"")
    count = meta.get("timm_num_classes")
    if family == "timm" and count is not None and count not in (0, num_classes):
        raise ModelFileError(f"the model config's 'timm_num_classes' is {count} but the model has "
                             f"{num_classes} classes (0 for a backbone); {fix}")


def from_canonical(canonical: VisionTransformer, meta: dict[str, Any]) -> nn.Module:
    """The family's model (named by ``meta``, from :func:`metadata`) carrying ``canonical``'s dims and weights."""
    family = meta.get("family", "vitrim")
    check_family_metadata(meta, canonical.config.num_classes)
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
