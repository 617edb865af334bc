"""vitrim's own :class:`~vitrim.models.VisionTransformer`: the canonical model, converted as it is."""

from __future__ import annotations

from typing import Any

from torch import nn

from vitrim.adapters.registry import Family, register
from vitrim.models import VisionTransformer


def _identity(model: nn.Module) -> nn.Module:
    return model


def _rebuild(canonical: nn.Module, meta: dict[str, Any]) -> nn.Module:
    return canonical


FAMILY = register(Family(
    name="vitrim",
    summary="vitrim's VisionTransformer (model directories and presets)",
    recognizes=lambda model: isinstance(model, VisionTransformer),
    to_canonical=_identity,
    from_canonical=_rebuild,
    metadata=lambda model: {},
    canonical=True,
    order=0,
))
