"""Physical slicing of the canonical ViT: a :class:`PrunePlan` in, a smaller model out."""

from __future__ import annotations

import torch
from torch import nn

from vitrim.errors import ConfigError
from vitrim.models import VisionTransformer
from vitrim.prune.plan import PrunePlan


def qkv_rows(heads: list[int], qk: list[list[int]], v: list[list[int]], H: int, qk_dim: int,
             v_dim: int) -> torch.Tensor:
    """Row indices of the fused qkv projection ([q | k | v]) that a plan keeps."""
    q_rows = [h * qk_dim + c for h, chans in zip(heads, qk) for c in chans]
    k_rows = [H * qk_dim + r for r in q_rows]
    v_rows = [2 * H * qk_dim + h * v_dim + c for h, chans in zip(heads, v) for c in chans]
    return torch.tensor(q_rows + k_rows + v_rows, dtype=torch.long)


def proj_columns(heads: list[int], v: list[list[int]], v_dim: int) -> torch.Tensor:
    return torch.tensor([h * v_dim + c for h, chans in zip(heads, v) for c in chans], dtype=torch.long)


def _copy_linear(dst: nn.Linear, src: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
    w = src.weight
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    dst.weight.copy_(w)
    if src.bias is not None:
        dst.bias.copy_(src.bias if rows is None else src.bias[rows])


def _copy_vector(dst: torch.Tensor, src: torch.Tensor, index: torch.Tensor) -> None:
    dst.copy_(src[..., index])


@torch.no_grad()
def slice_model(model: VisionTransformer, plan: PrunePlan) -> VisionTransformer:
    """A new, physically smaller model equal to ``model`` with the plan's structures removed."""
    cfg = model.config
    new = VisionTransformer(plan.pruned_config(cfg))
    new.token_reduction = model.token_reduction  # what the weights were tuned for stays the default
    E = torch.tensor(plan.embed, dtype=torch.long)
    pe_src, pe_dst = model.patch_embed.proj, new.patch_embed.proj
    pe_dst.weight.copy_(pe_src.weight[E])
    if pe_src.bias is not None:
        pe_dst.bias.copy_(pe_src.bias[E])
    if model.norm_pre is not None:
        _copy_norm(new.norm_pre, model.norm_pre, E)
    for name in ("cls_token", "dist_token", "reg_token"):
        if getattr(model, name) is not None:
            _copy_vector(getattr(new, name), getattr(model, name), E)
    _copy_vector(new.pos_embed, model.pos_embed, E)
    for old_block, new_block, bp, dims in zip(model.blocks, new.blocks, plan.blocks, cfg.blocks):
        if bp.attention:
            rows = qkv_rows(bp.heads, bp.qk, bp.v, dims.heads, dims.qk_dim, dims.v_dim)
            _copy_linear(new_block.attn.qkv, old_block.attn.qkv, rows, E)
            _copy_linear(new_block.attn.proj, old_block.attn.proj, E, proj_columns(bp.heads, bp.v, dims.v_dim))
            _copy_norm(new_block.norm1, old_block.norm1, E)
            _copy_layer_scale(new_block.ls1, old_block.ls1, E)
            if old_block.attn.q_norm is not None:
                if any(len(c) != dims.qk_dim for c in bp.qk):
                    raise ConfigError("query/key channels of a model with q/k norm cannot be pruned (the norm's "
                                      "statistics span the head); prune heads instead")
                new_block.attn.q_norm.load_state_dict(old_block.attn.q_norm.state_dict())
                new_block.attn.k_norm.load_state_dict(old_block.attn.k_norm.state_dict())
        if bp.mlp_on:
            _copy_mlp(new_block.mlp, old_block.mlp, torch.tensor(bp.mlp, dtype=torch.long), E)
            _copy_norm(new_block.norm2, old_block.norm2, E)
            _copy_layer_scale(new_block.ls2, old_block.ls2, E)
    _copy_norm(new.norm, model.norm, E)
    if model.attn_pool is not None:
        _copy_attention_pool(new.attn_pool, model.attn_pool, E)
    head_columns = torch.cat([E, cfg.embed_dim + E]) if cfg.pool == "cls_mean" else E
    _copy_linear(new.head, model.head, None, head_columns)
    if model.head_dist is not None:
        _copy_linear(new.head_dist, model.head_dist, None, E)
    return new.train(model.training)


def _copy_mlp(dst: nn.Module, src: nn.Module, M: torch.Tensor, E: torch.Tensor | None) -> None:
    """Hidden units ``M`` (a gated MLP's unit m owns fc1 rows m and M + m) and channels ``E``."""
    rows = torch.cat([M, src.fc2.in_features + M]) if src.gated else M
    _copy_linear(dst.fc1, src.fc1, rows, E)
    _copy_linear(dst.fc2, src.fc2, E, M)


def _copy_attention_pool(dst: nn.Module, src: nn.Module, E: torch.Tensor) -> None:
    """The pooling head keeps its attention width; only its embedding-side rows/columns go."""
    _copy_vector(dst.probe, src.probe, E)
    _copy_linear(dst.q, src.q, None, E)
    _copy_linear(dst.kv, src.kv, None, E)
    _copy_linear(dst.proj, src.proj, E, None)
    _copy_norm(dst.norm, src.norm, E)
    _copy_mlp(dst.mlp, src.mlp, torch.arange(src.mlp.fc2.in_features), E)


def _copy_norm(dst: nn.LayerNorm, src: nn.LayerNorm, E: torch.Tensor) -> None:
    dst.weight.copy_(src.weight[E])
    dst.bias.copy_(src.bias[E])


def _copy_layer_scale(dst: nn.Module, src: nn.Module, E: torch.Tensor) -> None:
    if hasattr(src, "gamma"):
        dst.gamma.copy_(src.gamma[E])
