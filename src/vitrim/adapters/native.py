"""A Hugging Face or timm model run by its own forward, as vitrim's measurement code expects it."""

from __future__ import annotations

import torch
from torch import nn

from vitrim.adapters import is_converted, require_family, to_canonical


class NativeModel(nn.Module):
    """``model`` called on pixels, returning a tensor; ``config`` is its canonical equivalent's.

    Latency and accuracy are measured on the family's own code (HF's attention kernels, timm's fused
    attention), while shapes and analytic FLOPs come from the canonical config. The output is the
    logits ``(B, classes)``; for a backbone, its pooled output (HF's pooler, timm's pooled features)
    or else the class token's features ``(B, C)``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.family = require_family(model)
        self.model = model
        self.config = to_canonical(model).config

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in, H, W) -> (B, classes)
        out = self.model(x)
        if isinstance(out, torch.Tensor):
            return out
        for name in ("logits", "pooler_output"):
            value = getattr(out, name, None)
            if value is not None:
                return value
        return out.last_hidden_state[:, 0]


def native(model: nn.Module) -> nn.Module:
    """``model`` itself for a vitrim ViT (or any model of no family), else a :class:`NativeModel`."""
    return NativeModel(model) if is_converted(model) else model
