"""Analytic parameter and FLOP counts of the canonical ViT, per block and per component.

FLOPs count multiply-accumulates as 2 operations in the matrix products (linear layers, patch
embedding, q.k^T and attention.v), the same convention as ``torch.utils.flop_counter``;
normalisation, softmax, GELU and additions are left out (they are a few percent).
"""

from __future__ import annotations

from dataclasses import dataclass

from vitrim.models.config import BlockDims, ViTConfig


@dataclass(frozen=True)
class Cost:
    params: int
    flops: int

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.params + other.params, self.flops + other.flops)


ZERO = Cost(0, 0)


def attention_cost(C: int, dims: BlockDims, tokens: int, qkv_bias: bool = True, qk_norm: bool = False) -> Cost:
    if not dims.attention:
        return ZERO
    H, qk, v, N = dims.heads, dims.qk_dim, dims.v_dim, tokens
    width = H * (2 * qk + v)
    params = C * width + (width if qkv_bias else 0) + H * v * C + C + 2 * C  # qkv, proj, norm1
    params += 4 * qk if qk_norm else 0
    flops = 2 * N * C * width + 2 * N * N * H * (qk + v) + 2 * N * H * v * C
    return Cost(params, flops)


def mlp_cost(C: int, dims: BlockDims, tokens: int, gated: bool = False) -> Cost:
    """fc1 (two halves when ``gated``), fc2 and norm2."""
    if not dims.mlp:
        return ZERO
    M, up = dims.mlp_dim, 2 if gated else 1
    return Cost((up + 1) * C * M + up * M + C + 2 * C, 2 * (up + 1) * tokens * C * M)


def layer_scale_params(cfg: ViTConfig, dims: BlockDims) -> int:
    if cfg.layer_scale_init is None:
        return 0
    return cfg.embed_dim * (int(dims.attention) + int(dims.mlp))


def block_cost(cfg: ViTConfig, index: int, tokens: int | None = None) -> dict[str, Cost]:
    dims = cfg.blocks[index]
    N = cfg.num_tokens if tokens is None else tokens
    ls = layer_scale_params(cfg, dims)
    return {"attention": attention_cost(cfg.embed_dim, dims, N, cfg.qkv_bias, cfg.qk_norm) + Cost(ls // 2 if dims.mlp else ls, 0),
            "mlp": mlp_cost(cfg.embed_dim, dims, N, cfg.mlp_gated) + Cost(ls - (ls // 2 if dims.mlp else ls), 0)}


def embedding_cost(cfg: ViTConfig) -> Cost:
    """Patch embedding, prefix tokens, position embedding and the pre-encoder norm."""
    C, p = cfg.embed_dim, cfg.patch_size
    patch = cfg.in_chans * p * p
    params = patch * C + C * int(cfg.patch_bias) + cfg.num_pos_embed * C + cfg.num_prefix_tokens * C
    params += 2 * C if cfg.pre_norm else 0
    return Cost(params, 2 * cfg.num_patches * patch * C)


def attention_pool_cost(cfg: ViTConfig, tokens: int | None = None) -> Cost:
    """SigLIP's attention-pooling head (pool='map'): one probe query over ``tokens`` tokens."""
    if cfg.pool != "map":
        return ZERO
    C, W, N = cfg.embed_dim, cfg.map_dim, cfg.num_tokens if tokens is None else tokens
    params = C + (C * W + W) + (2 * C * W + 2 * W) + (W * C + C) + 2 * C
    flops = 2 * C * W + 2 * N * C * 2 * W + 2 * 2 * N * W + 2 * W * C
    mlp = mlp_cost(C, BlockDims(1, 1, 1, cfg.pool_mlp_dim), 1, cfg.mlp_gated)
    return Cost(params, flops) + Cost(mlp.params - 2 * C, mlp.flops)  # the norm is counted above


def head_cost(cfg: ViTConfig, tokens: int | None = None) -> Cost:
    """The final norm, the pooling head (if any) and the classifier(s)."""
    C, K, heads = cfg.embed_dim, cfg.num_classes, 1 + int(cfg.distill_head)
    linear = Cost(cfg.pooled_dim * K + K * int(cfg.head_bias), 2 * cfg.pooled_dim * K)
    if cfg.distill_head:
        linear = linear + Cost(C * K + K, 2 * C * K)
    return Cost(2 * C, 0) + attention_pool_cost(cfg, tokens) + linear


def cost_breakdown(cfg: ViTConfig) -> dict[str, Cost]:
    """Per component: ``embedding``, ``block{i}.attention``, ``block{i}.mlp``, ``head``."""
    parts = {"embedding": embedding_cost(cfg)}
    for i in range(cfg.depth):
        for name, cost in block_cost(cfg, i).items():
            parts[f"block{i}.{name}"] = cost
    parts["head"] = head_cost(cfg)
    return parts


def model_cost(cfg: ViTConfig) -> Cost:
    """Total parameters and forward FLOPs for one image."""
    total = ZERO
    for cost in cost_breakdown(cfg).values():
        total = total + cost
    return total
