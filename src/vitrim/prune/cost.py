"""What a model costs: analytic FLOPs or params, or any per-sub-layer cost function supplied."""

from __future__ import annotations

from collections.abc import Callable

from vitrim.bench.flops import attention_cost, embedding_cost, head_cost, mlp_cost
from vitrim.errors import ConfigError
from vitrim.models.config import BlockDims, ViTConfig

METRICS = ("flops", "params")

# cost of one block's sub-layer: (metric value) from (embed_dim, dims, tokens)
SublayerCost = Callable[[int, BlockDims, int], float]


class CostModel:
    """Cost of a whole configuration as the sum of embedding, sub-layers and head."""

    def __init__(self, metric: str, attention: SublayerCost | None = None, mlp: SublayerCost | None = None,
                 fixed: Callable[[ViTConfig], float] | None = None) -> None:
        if metric not in METRICS and None in (attention, mlp, fixed):
            raise ConfigError(f"unknown cost metric {metric!r}; use one of {', '.join(METRICS)} "
                              f"or supply attention, mlp and fixed cost functions")
        self.metric = metric
        self.attention = attention or (lambda C, d, N: getattr(attention_cost(C, d, N), metric))
        self.mlp = mlp or (lambda C, d, N: getattr(mlp_cost(C, d, N), metric))
        self.fixed = fixed or (lambda cfg: getattr(embedding_cost(cfg), metric) + getattr(head_cost(cfg), metric))

    def block(self, C: int, dims: BlockDims, tokens: int) -> float:
        total = 0.0
        if dims.attention:
            total += self.attention(C, dims, tokens)
        if dims.mlp:
            total += self.mlp(C, dims, tokens)
        return total

    def total(self, cfg: ViTConfig) -> float:
        N = cfg.num_tokens
        return self.fixed(cfg) + sum(self.block(cfg.embed_dim, d, N) for d in cfg.blocks)
