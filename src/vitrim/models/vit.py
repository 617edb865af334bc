"""The canonical vitrim ViT: one readable file, per-block dimensions, fused SDPA attention."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitrim.errors import DataError
from vitrim.models.config import BlockDims, ViTConfig


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, P, C)


class Attention(nn.Module):
    """Multi-head attention whose heads have ``qk_dim`` query/key and ``v_dim`` value channels.

    One fused input projection, rows laid out as [q (H*qk) | k (H*qk) | v (H*v)].
    """

    def __init__(self, embed_dim: int, dims: BlockDims, qkv_bias: bool = True, qk_norm: bool = False,
                 norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.heads, self.qk_dim, self.v_dim = dims.heads, dims.qk_dim, dims.v_dim
        self.scale = dims.scale
        self.qkv = nn.Linear(embed_dim, dims.heads * (2 * dims.qk_dim + dims.v_dim), bias=qkv_bias)
        self.q_norm = nn.LayerNorm(dims.qk_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = nn.LayerNorm(dims.qk_dim, eps=norm_eps) if qk_norm else None
        self.proj = nn.Linear(dims.heads * dims.v_dim, embed_dim)

    def split_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, _ = x.shape
        H, qk, v = self.heads, self.qk_dim, self.v_dim
        q, k, val = self.qkv(x).split([H * qk, H * qk, H * v], dim=-1)
        q = q.view(B, N, H, qk).transpose(1, 2)  # (B, H, N, qk)
        k = k.view(B, N, H, qk).transpose(1, 2)  # (B, H, N, qk)
        val = val.view(B, N, H, v).transpose(1, 2)  # (B, H, N, v)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, val

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """Attention-weighted values before the output projection: (B, N, C) -> (B, N, H*v)."""
        B, N, _ = x.shape
        q, k, v = self.split_qkv(x)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, H, N, v)
        return out.transpose(1, 2).reshape(B, N, self.heads * self.v_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.mix(x))


class Mlp(nn.Module):
    def __init__(self, embed_dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, embed_dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop a residual branch for whole samples."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class Block(nn.Module):
    """Pre-norm block; a removed sub-layer is simply absent (``None``)."""

    def __init__(self, cfg: ViTConfig, dims: BlockDims, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        C = cfg.embed_dim
        self.drop_path_rate = drop_path_rate
        self.norm1 = nn.LayerNorm(C, eps=cfg.norm_eps) if dims.attention else None
        self.attn = Attention(C, dims, cfg.qkv_bias, cfg.qk_norm, cfg.norm_eps) if dims.attention else None
        self.ls1 = _layer_scale(C, cfg.layer_scale_init) if dims.attention else None
        self.norm2 = nn.LayerNorm(C, eps=cfg.norm_eps) if dims.mlp else None
        self.mlp = Mlp(C, dims.mlp_dim, cfg.dropout) if dims.mlp else None
        self.ls2 = _layer_scale(C, cfg.layer_scale_init) if dims.mlp else None

    def attention_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls1(self.attn(self.norm1(x)))

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, N, C)
        if self.attn is not None:
            x = x + drop_path(self.attention_branch(x), self.drop_path_rate, self.training)
        if self.mlp is not None:
            x = x + drop_path(self.mlp_branch(x), self.drop_path_rate, self.training)
        return x


def _layer_scale(dim: int, init: float | None) -> nn.Module:
    return LayerScale(dim, init) if init is not None else nn.Identity()


class VisionTransformer(nn.Module):
    """A ViT built from a :class:`ViTConfig`; blocks may differ in every dimension."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.config = cfg
        # the token reduction these weights were fine-tuned for ({"method", "layers"}), if any:
        # vitrim.reduce_tokens uses it by default, vitrim.save keeps it
        self.token_reduction: dict[str, Any] | None = None
        C = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C)) if cfg.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, C)) if cfg.distill_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, C)) if cfg.reg_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_pos_embed, C))
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist() if cfg.depth > 1 else [cfg.drop_path_rate]
        self.blocks = nn.ModuleList(Block(cfg, dims, rate) for dims, rate in zip(cfg.blocks, rates))
        self.norm = nn.LayerNorm(C, eps=cfg.norm_eps)  # on the tokens, or on the pooled vector (fc_norm)
        self.head = nn.Linear(C, cfg.num_classes)
        self.head_dist = nn.Linear(C, cfg.num_classes) if cfg.distill_head else None
        self.reset_parameters()

    @property
    def num_prefix_tokens(self) -> int:
        return self.config.num_prefix_tokens

    def reset_parameters(self) -> None:
        """ViT initialisation: truncated normal (std 0.02) for linears and tokens, zero biases."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.dist_token, self.reg_token):
            if token is not None:
                nn.init.trunc_normal_(token, std=0.02)
        w = self.patch_embed.proj.weight
        nn.init.trunc_normal_(w.view(w.shape[0], -1), std=math.sqrt(1.0 / w[0].numel()))
        nn.init.zeros_(self.patch_embed.proj.bias)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.zeros_(self.head.weight)
        if self.head_dist is not None:
            nn.init.zeros_(self.head_dist.weight)

    def check_input(self, x: torch.Tensor) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_chans or x.shape[2:] != (cfg.image_size, cfg.image_size):
            raise DataError(
                f"model expects images of shape (B, {cfg.in_chans}, {cfg.image_size}, {cfg.image_size}), "
                f"got {tuple(x.shape)}; resize the input or use a model built for this size"
            )

    def embed(self, x: torch.Tensor) -> torch.Tensor:  # (B, in, H, W) -> (B, N, C)
        self.check_input(x)
        return self.add_prefix_and_position(self.patch_embed(x))

    def add_prefix_and_position(self, x: torch.Tensor) -> torch.Tensor:  # (B, P, C) -> (B, N, C)
        """Patch tokens in, the sequence the blocks see out: prefix tokens and position embedding."""
        if not self.config.pos_embed_prefix:
            x = x + self.pos_embed
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.dist_token, self.reg_token)
                  if t is not None]
        if prefix:
            x = torch.cat([*prefix, x], dim=1)
        return x + self.pos_embed if self.config.pos_embed_prefix else x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Output tokens ``(B, N, C)``, prefix tokens first (normalised unless ``fc_norm``)."""
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)

    def final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens if self.config.fc_norm else self.norm(tokens)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, C)
        if self.config.pool == "cls":
            return tokens[:, 0]
        return tokens[:, self.num_prefix_tokens :].mean(dim=1)

    def classify(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits from normalised tokens (B, N, C); with a distillation head, the two heads' mean."""
        pooled = self.pool(tokens)
        logits = self.head(self.norm(pooled) if self.config.fc_norm else pooled)
        if self.head_dist is not None:
            logits = (logits + self.head_dist(tokens[:, 1])) / 2
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in, H, W) -> (B, classes)
        return self.classify(self.forward_features(x))
