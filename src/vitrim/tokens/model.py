"""A trained ViT whose token count adapts at run time: one knob, changed between calls."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitrim.errors import ConfigError
from vitrim.models import VisionTransformer
from vitrim.tokens.primitives import (bipartite_merge, class_attention, drop_tokens, gather_tokens, mass_counts,
                                      prefix_dest, top_patches)

METHODS = ("drop", "evit", "tome")
MODES = ("static", "dynamic")


def default_layers(depth: int) -> tuple[int, ...]:
    step = max(1, depth // 3)
    return tuple(range(step, depth - 1, step)) or (0,)


def check_method(method: str) -> None:
    """A :class:`ConfigError` naming the methods unless ``method`` is one of them."""
    if method not in METHODS:
        raise ConfigError(f"unknown token method {method!r}; use one of {', '.join(METHODS)}")


def check_train_keep(train_keep: tuple[float, float]) -> tuple[float, float]:
    """``(low, high)`` as floats; a :class:`ConfigError` unless ``0 < low <= high <= 1``."""
    low, high = train_keep
    if not 0 < low <= high <= 1:
        raise ConfigError(f"train_keep must satisfy 0 < low <= high <= 1, got {tuple(train_keep)}")
    return float(low), float(high)


def packed(token_wise, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``token_wise(x)`` computed on the valid tokens only (per-image counts: the padding costs
    nothing); padding gets zeros. x (B, N, C), valid (B, N) or None."""
    if valid is None:
        return token_wise(x)
    result = token_wise(x[valid].unsqueeze(0))[0]  # (T, C'): the T valid tokens of the batch
    out = result.new_zeros(*x.shape[:-1], result.shape[-1])
    out[valid] = result
    return out


class TokenReducedViT(nn.Module):
    """Wraps a :class:`VisionTransformer`; reduces tokens after the blocks in ``layers``.

    Knobs (settable between calls): ``keep`` — fraction of patch tokens kept at each reduction
    layer (static mode); ``tau`` — in dynamic mode, per image: for ``drop``/``evit`` the share of
    the class attention the kept tokens must cover, for ``tome`` the cosine similarity above which
    two tokens merge (images with much plain background merge more). Higher ``tau`` keeps more.
    ``keep=1`` (or ``tau=1`` with nothing to drop) reproduces the wrapped model.
    ``train_keep=(low, high)``: in training mode (static) each batch runs at a keep ratio drawn
    from the range, so fine-tuned weights serve the whole knob range; with ``sandwich``, half of
    each batch runs at ``high`` instead (the "sandwich" rule of slimmable networks, meant to keep
    the widest setting's accuracy).
    """

    def __init__(self, model: VisionTransformer, method: str = "tome", *, layers: Sequence[int] | None = None,
                 keep: float = 1.0, tau: float | None = None, mode: str = "static",
                 train_keep: tuple[float, float] | None = None, sandwich: bool = False) -> None:
        super().__init__()
        if not isinstance(model, VisionTransformer):
            raise ConfigError(f"token reduction needs a vitrim ViT, got {type(model).__name__}")
        check_method(method)
        if mode not in MODES:
            raise ConfigError(f"unknown mode {mode!r}; use static or dynamic")
        cfg = model.config
        layers = tuple(sorted(set(default_layers(cfg.depth) if layers is None else layers)))
        for i in layers:
            if not 0 <= i < cfg.depth:
                raise ConfigError(f"reduction layer {i} is outside the model's {cfg.depth} blocks (0..{cfg.depth - 1})")
            if cfg.blocks[i].attention is False:
                raise ConfigError(f"block {i} has no attention sub-layer to read token scores from; "
                                  f"choose another layer")
        if method in ("drop", "evit") and not cfg.class_token:
            raise ConfigError(f"{method} scores tokens by the class token's attention, and this model has no "
                              f"class token; use method='tome'")
        self.model, self.method, self.layers, self.mode = model, method, layers, mode
        self.train_keep = None if train_keep is None else check_train_keep(train_keep)
        self.sandwich = sandwich
        self.keep = keep
        self.tau = tau
        self.last_token_counts: list[float] = []

    @property
    def config(self):
        return self.model.config

    @property
    def keep(self) -> float:
        return self._keep

    @keep.setter
    def keep(self, value: float) -> None:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= 1):
            raise ConfigError(f"keep ratio must be in (0, 1], got {value!r}")
        self._keep = float(value)

    @property
    def tau(self) -> float | None:
        return self._tau

    @tau.setter
    def tau(self, value: float | None) -> None:
        similarity = self.method == "tome"  # else a share of the class attention
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)
                                      and (-1 <= value <= 1 if similarity else 0 < value <= 1)):
            span = "[-1, 1] (a cosine similarity)" if similarity else "(0, 1] (a share of the class attention)"
            raise ConfigError(f"threshold tau for {self.method} must be a finite number in {span}, got {value!r}")
        if value is not None and self.mode != "dynamic":
            raise ConfigError("a threshold gives per-image token counts: build with mode='dynamic'")
        self._tau = None if value is None else float(value)

    # -- forward ---------------------------------------------------------------------------
    def _attention(self, block, x: torch.Tensor, bias: torch.Tensor | None, need_scores: bool):
        """Block attention with an optional additive bias; returns (output, class scores, keys)."""
        attn = block.attn
        B, N, _ = x.shape
        q, k, v = attn.split_qkv(block.norm1(x))  # (B, H, N, d)
        mask = bias.to(q.dtype) if bias is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)  # (B, H, N, v)
        out = attn.proj(out.transpose(1, 2).reshape(B, N, attn.heads * attn.v_dim))
        scores = class_attention(q, k, attn.scale, bias) if need_scores and self.method != "tome" else None
        keys = k.mean(dim=1) if need_scores and self.method == "tome" else None  # (B, N, d)
        return block.ls1(out), scores, keys

    def _bias(self, sizes: torch.Tensor, valid: torch.Tensor | None, weighted: bool) -> torch.Tensor | None:
        """Additive attention logits (B, 1, 1, N): ``log(size)`` once tokens stand for several
        patches (proportional attention: merged and fused tokens keep their patches' attention
        mass), ``-inf`` on padding."""
        bias = sizes.clamp_min(1e-12).log() if weighted else None
        if valid is not None:
            pad = torch.zeros_like(sizes).masked_fill(~valid, float("-inf"))
            bias = pad if bias is None else bias + pad
        return None if bias is None else bias[:, None, None, :]  # (B, 1, 1, N)

    def _reduce(self, x, sizes, valid, scores, keys):
        """One reduction step: (tokens, sizes, valid, dest) — see ``primitives`` for ``dest``."""
        prefix = self.model.num_prefix_tokens
        patches = int(x.shape[1]) - prefix  # a Python int under tracing too (static counts export)
        if self.method == "tome":
            if self.mode == "dynamic" and self.tau is not None:
                return self._merge(x, sizes, valid, keys, patches // 2, threshold=self.tau)
            return self._merge(x, sizes, valid, keys, patches - max(1, round(self.keep * patches)))
        if self.mode == "static" or self.tau is None:
            keep = max(1, round(self.keep * patches))
            if keep >= patches:
                return x, sizes, valid, torch.arange(x.shape[1]).expand(x.shape[0], -1)
            x, sizes, dest = drop_tokens(x, sizes, scores, keep, prefix, fuse=self.method == "evit")
            return x, sizes, valid, dest
        if valid is not None:
            scores = scores * valid
        B = x.shape[0]
        counts = mass_counts(scores, self.tau, prefix)  # (B,)
        width = int(counts.max())
        index = top_patches(scores[:, prefix:], width)  # (B, width)
        ranks = scores[:, prefix:].gather(1, index).argsort(dim=1, descending=True).argsort(dim=1)
        keep_mask = ranks < counts.unsqueeze(1)  # (B, width)
        kept = gather_tokens(x[:, prefix:], index)
        kept_sizes = sizes[:, prefix:].gather(1, index) * keep_mask
        new_valid = torch.cat([torch.ones_like(keep_mask[:, :prefix]) if prefix else keep_mask[:, :0],
                               keep_mask], dim=1)
        parts, size_parts = [x[:, :prefix], kept * keep_mask.unsqueeze(-1)], [sizes[:, :prefix], kept_sizes]
        dest = prefix_dest(B, x.shape[1], prefix)
        if self.method == "evit":
            dropped_weight = scores[:, prefix:].clone()
            dropped_weight.scatter_(1, index, dropped_weight.gather(1, index) * (~keep_mask))
            total = dropped_weight.sum(1, keepdim=True)
            fused = (dropped_weight.unsqueeze(-1) * x[:, prefix:]).sum(1, keepdim=True) / total.clamp_min(1e-12).unsqueeze(-1)
            parts.append(fused)
            size_parts.append(sizes[:, prefix:].sum(1, keepdim=True) - kept_sizes.sum(1, keepdim=True))
            new_valid = torch.cat([new_valid, total > 0], dim=1)
            dest[:, prefix:] = prefix + width
        slots = torch.where(keep_mask, prefix + torch.arange(width).expand(B, -1), dest[:, prefix:].gather(1, index))
        dest[:, prefix:] = dest[:, prefix:].scatter(1, index, slots)
        if valid is not None:
            dest = dest.masked_fill(~valid, -1)
        return torch.cat(parts, 1), torch.cat(size_parts, 1), new_valid, dest

    def _merge(self, x, sizes, valid, keys, r, threshold=None):
        x, sizes, dest, new_valid = bipartite_merge(x, keys, sizes, r, self.model.num_prefix_tokens,
                                                    threshold=threshold, valid=valid)
        return x, sizes, new_valid, dest

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, object]:
        """Initial tokens (B, N, C) and whatever :meth:`refine` needs later (nothing here)."""
        return self.model.embed(images), None

    def embedding_flops(self) -> float:
        """FLOPs per image spent turning pixels into tokens in the last call."""
        from vitrim.bench.flops import embedding_cost

        return float(embedding_cost(self.config).flops)

    def reduces_after(self, block: int) -> bool:
        """Whether tokens are reduced after ``block`` with the current knobs."""
        return block in self.layers and (self.keep < 1 or (self.mode == "dynamic" and self.tau is not None))

    def refine(self, x: torch.Tensor, dest: torch.Tensor, valid: torch.Tensor | None, context: object) -> torch.Tensor:
        """Hook after each reduction: the reduced tokens, given where every old token went."""
        return x

    def forward_features(self, images: torch.Tensor, restore: bool = False):
        """Normalised tokens (B, N', C), their sizes (B, N') and validity mask (or None).

        With ``restore``, the normalised full grid (B, prefix + patches, C) instead: kept tokens
        scattered back to their patches, fused or merged patches filled from the token they went
        into, dropped patches from their last state before they were dropped.
        """
        x, context = self.embed(images)
        B, N, C = x.shape
        prefix = self.model.num_prefix_tokens
        sizes = torch.ones(B, N, dtype=x.dtype)
        valid: torch.Tensor | None = None
        source = torch.arange(prefix, N).expand(B, -1)  # (B, P): each patch's current token
        frozen = torch.zeros(B, N - prefix, C, dtype=x.dtype)
        counts = []
        weighted = False  # whether some token stands for several patches yet
        for i, block in enumerate(self.model.blocks):
            counts.append(float(valid.sum(1).float().mean()) if valid is not None else float(x.shape[1]))
            reduce_here = self.reduces_after(i)
            if block.attn is not None:
                out, scores, keys = self._attention(block, x, self._bias(sizes, valid, weighted), reduce_here)
                x = x + out
            if block.mlp is not None:
                x = x + packed(block.mlp_branch, x, valid)
            if reduce_here:
                old = x
                x, sizes, valid, dest = self._reduce(x, sizes, valid, scores, keys)
                weighted = weighted or self.method in ("tome", "evit")
                x = self.refine(x, dest, valid, context)
                if restore:
                    alive = source >= 0
                    moved = torch.where(alive, dest.gather(1, source.clamp_min(0)), torch.full_like(source, -1))
                    dropped_now = alive & (moved < 0)
                    frozen = torch.where(dropped_now.unsqueeze(-1), gather_tokens(old, source.clamp_min(0)), frozen)
                    source = moved
        self.last_token_counts = counts
        if restore:
            grid = torch.where((source >= 0).unsqueeze(-1), gather_tokens(x, source.clamp_min(0)), frozen)
            return self.model.final_norm(torch.cat([x[:, :prefix], grid], dim=1)), None, None
        return self.model.final_norm(x), sizes, valid

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, in, H, W) -> (B, classes)
        if not (self.training and self.mode == "static" and self.train_keep is not None):
            return self.classify_images(images)
        low, high = self.train_keep
        chosen, half = self._keep, images.shape[0] // 2 if self.sandwich else 0
        parts = []
        try:
            if half:  # the top of the range on half the batch
                self._keep = high
                parts.append(self.classify_images(images[:half]))
            self._keep = low + (high - low) * float(torch.rand(()))
            parts.append(self.classify_images(images[half:]))
        finally:
            self._keep = chosen
        return torch.cat(parts)

    def classify_images(self, images: torch.Tensor) -> torch.Tensor:  # (B, in, H, W) -> (B, classes)
        tokens, sizes, valid = self.forward_features(images)
        if self.model.config.pool == "cls":
            return self.model.classify(tokens)  # prefix tokens are never reduced
        prefix = self.model.num_prefix_tokens
        w = sizes[:, prefix:] * (valid[:, prefix:] if valid is not None else 1)
        pooled = (tokens[:, prefix:] * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True)
        logits = self.model.head(self.model.norm(pooled) if self.model.config.fc_norm else pooled)
        if self.model.head_dist is not None:
            logits = (logits + self.model.head_dist(tokens[:, 1])) / 2
        return logits


def reduce_tokens(model: nn.Module, method: str | None = None, **kwargs) -> TokenReducedViT:
    """A token-reduced view of ``model``; see :class:`TokenReducedViT`.

    A vitrim ViT shares its weights with the result; a Hugging Face or timm ViT is first
    converted to its exact vitrim equivalent (an unknown model gets an error naming the families).
    ``method`` (and ``layers``) default to the reduction the model was fine-tuned for
    (``vitrim train --arch tokens``), else ``"tome"`` (merging keeps accuracy best without
    training) at :func:`default_layers`.
    """
    if not isinstance(model, VisionTransformer):
        from vitrim.adapters import to_canonical

        model = to_canonical(model)
    tuned = model.token_reduction or {}
    if method is None:
        method = tuned.get("method", "tome")
    if kwargs.get("layers") is None and tuned.get("method") == method:
        kwargs["layers"] = tuned.get("layers")
    return TokenReducedViT(model, method, **kwargs).eval()


def reduced_flops(model: TokenReducedViT, images: torch.Tensor) -> float:
    """Matrix-product FLOPs per image of one call, from the token count each block saw."""
    from vitrim.bench.flops import block_cost, head_cost

    with torch.no_grad():
        model(images)
    cfg = model.config
    total = model.embedding_flops() + head_cost(cfg).flops
    for i, tokens in enumerate(model.last_token_counts):
        total += sum(c.flops for c in block_cost(cfg, i, tokens=round(tokens)).values())
    return float(total)
