"""The canonical vitrim ViT: one readable file, per-block dimensions, fused SDPA attention."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitrim.errors import ConfigError, DataError
from vitrim.models.config import BlockDims, ViTConfig
from vitrim.models.tokens import TokenReducer, TokenState, packed


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size,
                              bias=cfg.patch_bias)

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

    def mix(self, x: torch.Tensor, bias: torch.Tensor | None = None,
            capture: dict[str, Any] | None = None) -> torch.Tensor:
        """Attention-weighted values before the output projection: (B, N, C) -> (B, N, H*v).

        ``bias``: additive logits (B, 1, 1, N); ``capture`` (a dict) receives ``q``, ``k``,
        ``scale`` and ``bias`` for a token reducer.
        """
        B, N, _ = x.shape
        q, k, v = self.split_qkv(x)
        if capture is not None:
            capture.update(q=q, k=k, scale=self.scale, bias=bias)
        mask = None
        if bias is not None:  # (B, 1, 1, N)
            mask = bias.to(q.dtype)
            if torch.onnx.is_in_onnx_export():  # ONNX Runtime's Attention does not broadcast the query axis
                mask = mask.expand(-1, -1, N, -1)  # (B, 1, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)  # (B, H, N, v)
        return out.transpose(1, 2).reshape(B, N, self.heads * self.v_dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None,
                capture: dict[str, Any] | None = None) -> torch.Tensor:
        return self.proj(self.mix(x, bias, capture))


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class Activation(nn.Module):
    """The MLP's nonlinearity by name (see :data:`~vitrim.models.config.MLP_ACTS`)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.name == "gelu":
            return F.gelu(x)
        if self.name == "gelu_tanh":
            return F.gelu(x, approximate="tanh")
        if self.name == "quick_gelu":
            return quick_gelu(x)
        return F.silu(x)

    def extra_repr(self) -> str:
        return self.name


class Mlp(nn.Module):
    """``fc2(act(fc1(x)))``; gated: ``fc1`` emits [gate (M) | up (M)] and the hidden units are
    ``act(gate) * up`` (SwiGLU with silu), so hidden unit ``m`` owns fc1 rows ``m`` and ``M + m``."""

    def __init__(self, embed_dim: int, hidden: int, dropout: float = 0.0, act: str = "gelu",
                 gated: bool = False) -> None:
        super().__init__()
        self.gated = gated
        self.fc1 = nn.Linear(embed_dim, 2 * hidden if gated else hidden)
        self.act = Activation(act)
        self.fc2 = nn.Linear(hidden, embed_dim)
        self.drop = nn.Dropout(dropout)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, N, M)
        h = self.fc1(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.act(gate) * up
        return self.act(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.hidden(x))))


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


def make_mlp(cfg: ViTConfig, hidden: int) -> Mlp:
    return Mlp(cfg.embed_dim, hidden, cfg.dropout, cfg.mlp_act, cfg.mlp_gated)


class Block(nn.Module):
    """Pre-norm block; a removed sub-layer is simply absent (``None``).

    ``state`` (a reduced sequence) adds its attention bias and runs the MLP on valid tokens only;
    ``capture`` records the attention's queries and keys for a token reducer.
    """

    def __init__(self, cfg: ViTConfig, dims: BlockDims, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        C = cfg.embed_dim
        self.drop_path_rate = drop_path_rate
        self.norm1 = nn.LayerNorm(C, eps=cfg.norm_eps) if dims.attention else None
        self.attn = Attention(C, dims, cfg.qkv_bias, cfg.qk_norm, cfg.norm_eps) if dims.attention else None
        self.ls1 = _layer_scale(C, cfg.layer_scale_init) if dims.attention else None
        self.norm2 = nn.LayerNorm(C, eps=cfg.norm_eps) if dims.mlp else None
        self.mlp = make_mlp(cfg, dims.mlp_dim) if dims.mlp else None
        self.ls2 = _layer_scale(C, cfg.layer_scale_init) if dims.mlp else None

    def attention_branch(self, x: torch.Tensor, bias: torch.Tensor | None = None,
                         capture: dict[str, Any] | None = None) -> torch.Tensor:
        return self.ls1(self.attn(self.norm1(x), bias, capture))

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor, state: TokenState | None = None,
                capture: dict[str, Any] | None = None) -> torch.Tensor:  # (B, N, C) -> (B, N, C)
        if self.attn is not None:
            bias = state.attention_bias() if state is not None else None
            x = x + drop_path(self.attention_branch(x, bias, capture), self.drop_path_rate, self.training)
        if self.mlp is not None:
            valid = state.valid if state is not None else None
            x = x + drop_path(packed(self.mlp_branch, x, valid), self.drop_path_rate, self.training)
        return x


def _layer_scale(dim: int, init: float | None) -> nn.Module:
    return LayerScale(dim, init) if init is not None else nn.Identity()


class AttentionPool(nn.Module):
    """Multi-head attention pooling (SigLIP's head): a learned probe attends over the tokens, then
    a residual MLP. The attention is ``dim`` wide whatever the embedding width (it survives
    embedding pruning): q from the probe, [k | v] from the tokens."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        C, W = cfg.embed_dim, cfg.map_dim
        self.heads, self.dim = cfg.pool_heads, W
        self.probe = nn.Parameter(torch.zeros(1, 1, C))
        self.q = nn.Linear(C, W)
        self.kv = nn.Linear(C, 2 * W)
        self.proj = nn.Linear(W, C)
        self.norm = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.mlp = make_mlp(cfg, cfg.pool_mlp_dim)

    def forward(self, tokens: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:  # (B, N, C) -> (B, C)
        B, N, _ = tokens.shape
        H, W = self.heads, self.dim
        q = self.q(self.probe.repeat(B, 1, 1)).view(B, 1, H, W // H).transpose(1, 2)  # (B, H, 1, d)
        k, v = self.kv(tokens).view(B, N, 2, H, W // H).permute(2, 0, 3, 1, 4)  # (B, H, N, d) each
        mask = bias.to(q.dtype) if bias is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, 1, d)
        x = self.proj(out.transpose(1, 2).reshape(B, 1, W))  # (B, 1, C)
        return (x + self.mlp(self.norm(x)))[:, 0]


class VisionTransformer(nn.Module):
    """A ViT built from a :class:`ViTConfig`; blocks may differ in every dimension.

    This is vitrim's one ViT forward: token reduction passes a :class:`TokenReducer` to
    :meth:`forward_features` / :meth:`forward_tokens` and the same blocks (drop-path, LayerScale,
    q/k norm, registers) run on the reduced sequence.
    """

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
        self.norm_pre = nn.LayerNorm(C, eps=cfg.norm_eps) if cfg.pre_norm else None
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist() if cfg.depth > 1 else [cfg.drop_path_rate]
        self.blocks = nn.ModuleList(Block(cfg, dims, rate) for dims, rate in zip(cfg.blocks, rates))
        self.norm = nn.LayerNorm(C, eps=cfg.norm_eps)  # on the tokens, or on the pooled vector (fc_norm)
        self.attn_pool = AttentionPool(cfg) if cfg.pool == "map" else None
        self.head = nn.Linear(cfg.pooled_dim, cfg.num_classes, bias=cfg.head_bias)
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
        if self.attn_pool is not None:
            nn.init.trunc_normal_(self.attn_pool.probe, std=0.02)
        w = self.patch_embed.proj.weight
        nn.init.trunc_normal_(w.view(w.shape[0], -1), std=math.sqrt(1.0 / w[0].numel()))
        if self.patch_embed.proj.bias is not None:
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

    def position_embedding(self) -> torch.Tensor:  # (1, rows, C)
        """The position embedding for this image size: the stored grid resized bicubically when
        it was stored for another (``pos_embed_grid``), prefix rows unchanged."""
        cfg = self.config
        if cfg.stored_grid == cfg.grid_size:
            return self.pos_embed
        rows = cfg.num_prefix_tokens if cfg.pos_embed_prefix else 0
        g, G, C = cfg.stored_grid, cfg.grid_size, cfg.embed_dim
        grid = self.pos_embed[:, rows:].reshape(1, g, g, C).permute(0, 3, 1, 2)  # (1, C, g, g)
        grid = F.interpolate(grid.float(), size=(G, G), mode="bicubic", align_corners=False,
                             antialias=cfg.pos_embed_antialias)
        grid = grid.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, G * G, C)
        return torch.cat([self.pos_embed[:, :rows], grid], dim=1)

    def add_prefix_and_position(self, x: torch.Tensor) -> torch.Tensor:  # (B, P, C) -> (B, N, C)
        """Patch tokens in, the sequence the blocks see out: prefix tokens and position embedding."""
        pos = self.position_embedding()
        if not self.config.pos_embed_prefix:
            x = x + pos
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.dist_token, self.reg_token)
                  if t is not None]
        if prefix:
            x = torch.cat([*prefix, x], dim=1)
        x = x + pos if self.config.pos_embed_prefix else x
        return self.norm_pre(x) if self.norm_pre is not None else x

    def forward_tokens(self, x: torch.Tensor, reducer: TokenReducer | None = None, normalize: bool = True,
                       after_block: Callable[[int, torch.Tensor], None] | None = None
                       ) -> tuple[torch.Tensor, TokenState | None]:
        """Embedded tokens (B, N, C) through the blocks and (``normalize``) the final norm; with a
        ``reducer``, shortened between blocks; ``after_block(i, tokens)`` sees each block's output
        (after any reduction). Returns the tokens and their state (None without a reducer)."""
        state = TokenState.initial(x) if reducer is not None else None
        for i, block in enumerate(self.blocks):
            if reducer is None:
                x = block(x)
            else:
                reducer.record(i, x, state)
                capture: dict[str, Any] | None = {} if reducer.reduces_after(i) and block.attn is not None else None
                x = block(x, state, capture)
                if capture is not None:
                    x, state = reducer.reduce(i, x, state, capture)
            if after_block is not None:
                after_block(i, x)
        return (self.final_norm(x) if normalize else x), state

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int] | None = None, *,
                              norm: bool = True) -> list[torch.Tensor]:
        """Patch-token feature maps ``(B, C, G, G)`` after the blocks in ``indices`` (default: the
        last; negative counts from the end), for dense heads (detection, segmentation); ``norm``
        applies the final norm to each. A token-reduced model restores the full grid first:
        :meth:`vitrim.tokens.TokenReducedViT.forward_intermediates`."""
        wanted = self.block_indices(indices)
        maps: list[torch.Tensor] = []

        def grab(i: int, tokens: torch.Tensor) -> None:
            if i in wanted:
                maps.append(self.grid_map(self.norm(tokens) if norm else tokens))

        self.forward_tokens(self.embed(x), normalize=False, after_block=grab)
        return maps

    def block_indices(self, indices: Sequence[int] | None) -> set[int]:
        """Block indices (negative from the end) as a set; a :class:`ConfigError` outside the model."""
        depth = self.config.depth
        chosen = [depth - 1] if indices is None else list(indices)
        outside = [i for i in chosen if not -depth <= i < depth]
        if outside or not chosen:
            raise ConfigError(f"block indices {outside or chosen} are outside the model's {depth} blocks "
                              f"(0..{depth - 1}, or negative from the end)")
        return {i % depth for i in chosen}

    def grid_map(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, prefix + G*G, C) -> (B, C, G, G)
        """The patch tokens of a full sequence as a feature map."""
        G = self.config.grid_size
        return tokens[:, self.num_prefix_tokens:].transpose(1, 2).reshape(tokens.shape[0], -1, G, G)

    def forward_features(self, x: torch.Tensor, reducer: TokenReducer | None = None) -> torch.Tensor:
        """Output tokens ``(B, N, C)``, prefix tokens first (normalised unless ``fc_norm``)."""
        return self.forward_tokens(self.embed(x), reducer)[0]

    def final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens if self.config.fc_norm else self.norm(tokens)

    def pool(self, tokens: torch.Tensor, state: TokenState | None = None) -> torch.Tensor:  # (B, N, C) -> (B, C')
        """The vector the head reads; a reduced sequence's tokens count by the patches they stand for."""
        pool, prefix = self.config.pool, self.num_prefix_tokens
        if pool == "cls":
            return tokens[:, 0]
        if pool == "map":
            return self.attn_pool(tokens, state.attention_bias() if state is not None else None)
        if state is None:
            mean = tokens[:, prefix:].mean(dim=1)
        else:
            w = state.weights()[:, prefix:].unsqueeze(-1)  # (B, P, 1)
            mean = (tokens[:, prefix:] * w).sum(1) / w.sum(1)
        return torch.cat([tokens[:, 0], mean], dim=-1) if pool == "cls_mean" else mean

    def pooled(self, tokens: torch.Tensor, state: TokenState | None = None) -> torch.Tensor:
        """The pooled embedding a backbone outputs: :meth:`pool`, normalised when ``fc_norm``."""
        pooled = self.pool(tokens, state)
        return self.norm(pooled) if self.config.fc_norm else pooled

    def classify(self, tokens: torch.Tensor, state: TokenState | None = None) -> torch.Tensor:
        """Logits from normalised tokens (B, N, C); with a distillation head, the two heads' mean."""
        logits = self.head(self.pooled(tokens, state))
        if self.head_dist is not None:
            logits = (logits + self.head_dist(tokens[:, 1])) / 2
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in, H, W) -> (B, classes)
        return self.classify(self.forward_features(x))
