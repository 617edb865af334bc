"""FLOPs of a whole dense model (backbone + feature pyramid + head) and its backbone alone.

The backbone's FLOPs are the analytic count :func:`vitrim.bench.flops.model_cost` gives (what a
pruning target is relative to); the pyramid and head, convolutions, are counted by
``torch.utils.flop_counter`` on one image (the same convention: a multiply-add is 2).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vitrim.bench.flops import model_cost
from vitrim.models.dense import DenseModel


@torch.no_grad()
def dense_cost(model: DenseModel) -> dict[str, int]:
    """``backbone_flops``, ``head_flops`` (pyramid + head) and ``flops`` (their sum) per image,
    ``backbone_params`` and ``params``."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model.config
    grid = cfg.image_size // cfg.patch_size
    device = next(model.head.parameters()).device
    features = torch.zeros(1, cfg.embed_dim, grid, grid, device=device)  # (1, C, G, G)
    counter = FlopCounterMode(display=False)
    with counter:
        model.predict(features, (cfg.image_size, cfg.image_size))
    backbone = model_cost(cfg)
    head = int(counter.get_total_flops())
    return {"backbone_flops": backbone.flops, "head_flops": head, "flops": backbone.flops + head,
            "backbone_params": sum(p.numel() for p in model.backbone.parameters()),
            "params": sum(p.numel() for p in model.parameters())}


class BackboneOnly(nn.Module):
    """A dense model's backbone up to the feature map its pyramid reads: ``(B, in, H, W) -> (B, C, G, G)``."""

    def __init__(self, model: DenseModel) -> None:
        super().__init__()
        self.model = model.backbone
        self.index = model.dense.index

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_intermediates(images, [self.index])[0]
