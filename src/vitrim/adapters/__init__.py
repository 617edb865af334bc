"""Model families: one module each in :mod:`vitrim.adapters.families`, converting to and from the
canonical vitrim ViT, and registered in :mod:`vitrim.adapters.registry`.

The pruning, token and quantization code only ever sees the canonical ViT; a family converts its
model to it exactly and back, keeping the family's own classes and attributes valid. The functions
here dispatch through the registry. Model specs (``hf:DIR``, ``timm:NAME``, directories, presets)
are resolved in :mod:`vitrim.adapters.sources`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vitrim.adapters.registry import Family, get_family, supported_text, unsupported
from vitrim.adapters.registry import family_of as _family_of
from vitrim.models import VisionTransformer

# (the registry's ``families()`` is not re-exported: ``vitrim.adapters.families`` is the package of family modules)
__all__ = ["Family", "check_family_metadata", "family", "family_of", "from_canonical",
           "get_family", "head_kind", "is_converted", "metadata", "prunable", "require_family",
           "supported_text", "to_canonical", "unsupported"]


def family_of(model: Any) -> str | None:
    """The name of ``model``'s family (``"vitrim"``, ``"hf"``, ``"timm"``, ...), or None."""
    found = _family_of(model)
    return found.name if found is not None else None


def family(model: Any) -> Family:
    """``model``'s :class:`Family`; a :class:`~vitrim.errors.ConfigError` listing the supported ones."""
    found = _family_of(model)
    if found is None:
        raise unsupported(type(model).__name__)
    return found


def require_family(model: Any) -> str:
    """The model's family name; a :class:`~vitrim.errors.ConfigError` listing the supported families."""
    return family(model).name


def is_converted(model: Any) -> bool:
    """True for a model of a known family other than the canonical ViT (it runs through an adapter)."""
    found = _family_of(model)
    return found is not None and not found.canonical


def head_kind(model: nn.Module) -> str:
    """``"classifier"``, ``"pooler"`` (HF's dense+tanh on the class token) or ``"none"`` (a backbone)."""
    return family(model).head_kind(model)


def prunable(model: nn.Module) -> tuple[str, ...]:
    """The structure kinds (see :mod:`vitrim.prune.gates`) ``model``'s family can express when pruned."""
    return family(model).prunable


def to_canonical(model: nn.Module) -> VisionTransformer:
    """The exactly equivalent canonical ViT (a copy; a vitrim model is returned as it is)."""
    return family(model).to_canonical(model)


def metadata(model: nn.Module) -> dict[str, Any]:
    """What ``from_canonical`` needs to rebuild the family's model (JSON-serialisable), with its ``"family"``."""
    found = family(model)
    return {"family": found.name, **found.metadata(model)}


def check_family_metadata(meta: dict[str, Any], num_classes: int) -> None:
    """A :class:`~vitrim.errors.ModelFileError` unless ``meta`` holds what its family needs to rebuild
    the model (``num_classes`` is the canonical model's); a :class:`~vitrim.errors.ConfigError` for
    an unknown family."""
    get_family(meta.get("family", "vitrim")).check_metadata(meta, num_classes)


def from_canonical(canonical: VisionTransformer, meta: dict[str, Any]) -> nn.Module:
    """The family's model (named by ``meta``, from :func:`metadata`) carrying ``canonical``'s dims and weights."""
    found = get_family(meta.get("family", "vitrim"))
    found.check_metadata(meta, canonical.config.num_classes)
    return found.from_canonical(canonical, meta)
