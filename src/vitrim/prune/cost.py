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
        self.attention, self.mlp = attention, mlp
        self.fixed = fixed or (lambda cfg: getattr(embedding_cost(cfg), metric) + getattr(head_cost(cfg), metric))

    def block(self, C: int, dims: BlockDims, tokens: int, cfg: ViTConfig | None = None) -> float:
        """One block's cost; ``cfg`` (the model's) supplies what the dims do not say (qkv bias,
        q/k norm, a gated MLP) to the analytic counts."""
        total = 0.0
        if dims.attention:
            total += self.attention(C, dims, tokens) if self.attention is not None else getattr(
                attention_cost(C, dims, tokens, *((cfg.qkv_bias, cfg.qk_norm) if cfg else ())), self.metric)
        if dims.mlp:
            total += self.mlp(C, dims, tokens) if self.mlp is not None else getattr(
                mlp_cost(C, dims, tokens, bool(cfg and cfg.mlp_gated)), self.metric)
        return total

    def total(self, cfg: ViTConfig) -> float:
        N = cfg.num_tokens
        return self.fixed(cfg) + sum(self.block(cfg.embed_dim, d, N, cfg) for d in cfg.blocks)
