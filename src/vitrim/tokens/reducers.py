"""Token reducers: small objects the canonical ViT calls between blocks (see
:class:`vitrim.models.tokens.TokenReducer`), each a thin layer over the pure primitives.

:class:`DropReducer` keeps the most-attended patches (with ``fuse``, EViT: the dropped ones
become one attention-weighted token); :class:`MergeReducer` merges similar tokens (ToMe). Both
read the knobs ``keep`` (static: one count per batch) and ``tau`` (dynamic: per image), record
the token count every block saw, and can track where every patch went so that the full grid can
be restored for dense outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from vitrim.errors import ConfigError
from vitrim.models.tokens import TokenState
from vitrim.tokens.primitives import (bipartite_merge, class_attention, drop_tokens, fuse_tokens, gather_tokens,
                                      identity_dest, mass_counts, prefix_dest, top_patches)

MODES = ("static", "dynamic")
# refine(tokens, dest, valid) -> tokens: a hook after each reduction (the incremental-resolution ViT)
Refine = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class Reducer:
    """What every reducer shares: the knobs, the token counts, the grid tracking.

    ``prefix`` protected tokens (class, distillation, registers) are never reduced; ``layers``
    are the blocks after which the sequence shrinks.
    """

    method = ""
    similarity = False  # tau is a cosine similarity (else a share of the class attention)
    combines = False  # reduced tokens stand for several patches (proportional attention from then on)

    def __init__(self, prefix: int, layers: Sequence[int], *, keep: float = 1.0, tau: float | None = None,
                 mode: str = "static", refine: Refine | None = None) -> None:
        self.prefix, self.layers = prefix, tuple(layers)
        self._tau = None
        self.mode = mode
        self.keep = keep
        self.tau = tau
        self.refine = refine
        self.counts: list[float] = []
        self._tracking = False
        self._source: torch.Tensor | None = None
        self._frozen: torch.Tensor | None = None

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ConfigError(f"unknown mode {value!r}; use static or dynamic")
        if value == "static" and self._tau is not None:
            raise ConfigError("a threshold tau needs mode='dynamic'; set tau=None first")
        self._mode = value

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
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)
                                      and (-1 <= value <= 1 if self.similarity else 0 < value <= 1)):
            span = "[-1, 1] (a cosine similarity)" if self.similarity else "(0, 1] (a share of the class attention)"
            raise ConfigError(f"threshold tau for {self.method} must be a finite number in {span}, got {value!r}")
        if value is not None and self.mode != "dynamic":
            raise ConfigError("a threshold gives per-image token counts: build with mode='dynamic'")
        self._tau = None if value is None else float(value)

    @property
    def per_image(self) -> bool:
        return self.mode == "dynamic" and self.tau is not None

    def reduces_after(self, block: int) -> bool:
        return block in self.layers and (self.keep < 1 or self.per_image)

    def start(self, x: torch.Tensor, track: bool = False) -> None:
        """Before a forward of tokens x (B, N, C); ``track`` to :meth:`restore` the grid after it."""
        self.counts = []
        self._tracking = track
        B, N, C = x.shape
        self._source = torch.arange(self.prefix, N, device=x.device).expand(B, -1) if track else None  # (B, P): each patch's token
        self._frozen = x.new_zeros(B, N - self.prefix, C) if track else None

    def record(self, block: int, x: torch.Tensor, state: TokenState) -> None:
        valid = state.valid
        self.counts.append(float(valid.sum(1).float().mean()) if valid is not None else float(x.shape[1]))

    def reduce(self, block: int, x: torch.Tensor, state: TokenState,
               capture: dict[str, Any]) -> tuple[torch.Tensor, TokenState]:
        old = x
        x, sizes, valid, dest = self.step(x, state, capture)
        if self.refine is not None:
            x = self.refine(x, dest, valid)
        if self._tracking:
            self._follow(old, dest)
        return x, TokenState(sizes, valid, state.weighted or self.combines)

    @property
    def needs_dest(self) -> bool:
        """Whether :meth:`step` must say where each token went (to restore the grid, or for ``refine``)."""
        return self._tracking or self.refine is not None

    def step(self, x: torch.Tensor, state: TokenState, capture: dict[str, Any]):
        """One reduction: (tokens, sizes, valid, dest) — see :mod:`.primitives` for ``dest``
        (None allowed when not :attr:`needs_dest`)."""
        raise NotImplementedError

    def _follow(self, old: torch.Tensor, dest: torch.Tensor) -> None:
        source = self._source
        alive = source >= 0
        moved = torch.where(alive, dest.gather(1, source.clamp_min(0)), torch.full_like(source, -1))
        dropped_now = alive & (moved < 0)
        self._frozen = torch.where(dropped_now.unsqueeze(-1), gather_tokens(old, source.clamp_min(0)), self._frozen)
        self._source = moved

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """The full grid (B, prefix + patches, C) from the final tokens of a tracked forward: kept
        tokens at their patches, fused or merged patches from the token they went into, dropped
        patches from their last state before they were dropped."""
        if not self._tracking:
            raise RuntimeError("restore() needs a forward started with start(x, track=True)")
        source = self._source
        grid = torch.where((source >= 0).unsqueeze(-1), gather_tokens(x, source.clamp_min(0)), self._frozen)
        return torch.cat([x[:, : self.prefix], grid], dim=1)


class DropReducer(Reducer):
    """Keep the patches the class token attends to most; ``fuse``: EViT's one extra token."""

    def __init__(self, prefix: int, layers: Sequence[int], *, fuse: bool = False, **knobs: Any) -> None:
        self.fuse = fuse
        self.method = "evit" if fuse else "drop"
        self.combines = fuse
        super().__init__(prefix, layers, **knobs)

    def step(self, x, state, capture):
        prefix, sizes, valid = self.prefix, state.sizes, state.valid
        scores = class_attention(capture["q"], capture["k"], capture["scale"], capture["bias"])  # (B, N)
        patches = int(x.shape[1]) - prefix  # a Python int under tracing too (static counts export)
        if not self.per_image:
            keep = max(1, round(self.keep * patches))
            if keep >= patches:
                dest = identity_dest(x.shape[0], x.shape[1], x.device) if self.needs_dest else None
                return x, sizes, valid, dest
            x, sizes, dest = drop_tokens(x, sizes, scores, keep, prefix, fuse=self.fuse, need_dest=self.needs_dest)
            return x, sizes, valid, dest
        return self._drop_per_image(x, sizes, valid, scores if valid is None else scores * valid)

    def _drop_per_image(self, x, sizes, valid, scores):
        """Each image keeps the fewest patches covering ``tau`` of the class attention (padded)."""
        prefix, B = self.prefix, x.shape[0]
        counts = mass_counts(scores, self.tau, prefix)  # (B,)
        width = int(counts.max())
        index = top_patches(scores[:, prefix:], width)  # (B, width)
        ranks = scores[:, prefix:].gather(1, index).argsort(dim=1, descending=True).argsort(dim=1)
        keep_mask = ranks < counts.unsqueeze(1)  # (B, width)
        kept = gather_tokens(x[:, prefix:], index)
        kept_sizes = sizes[:, prefix:].gather(1, index) * keep_mask
        new_valid = torch.cat([torch.ones(B, prefix, dtype=torch.bool, device=x.device), keep_mask], dim=1)
        parts, size_parts = [x[:, :prefix], kept * keep_mask.unsqueeze(-1)], [sizes[:, :prefix], kept_sizes]
        if self.fuse:
            dropped_weight = scores[:, prefix:].clone()
            dropped_weight.scatter_(1, index, dropped_weight.gather(1, index) * (~keep_mask))
            fused, total = fuse_tokens(x[:, prefix:], dropped_weight)
            parts.append(fused)
            size_parts.append(sizes[:, prefix:].sum(1, keepdim=True) - kept_sizes.sum(1, keepdim=True))
            new_valid = torch.cat([new_valid, total > 0], dim=1)
        dest = self._per_image_dest(x, valid, index, keep_mask) if self.needs_dest else None
        return torch.cat(parts, 1), torch.cat(size_parts, 1), new_valid, dest

    def _per_image_dest(self, x, valid, index, keep_mask):
        """(B, N) destinations of :meth:`_drop_per_image`: kept patches to their slot, the rest to
        the fused token (EViT) or -1; padding stays -1."""
        prefix, (B, width) = self.prefix, keep_mask.shape
        dest = prefix_dest(B, x.shape[1], prefix, x.device)
        if self.fuse:
            dest[:, prefix:] = prefix + width
        slots = torch.where(keep_mask, prefix + torch.arange(width, device=x.device).expand(B, -1), dest[:, prefix:].gather(1, index))
        dest[:, prefix:] = dest[:, prefix:].scatter(1, index, slots)
        return dest if valid is None else dest.masked_fill(~valid, -1)


class MergeReducer(Reducer):
    """Merge the most similar token pairs (ToMe's bipartite matching on the keys)."""

    method = "tome"
    similarity = True
    combines = True

    def step(self, x, state, capture):
        keys = capture["k"].mean(dim=1)  # (B, N, d)
        patches = int(x.shape[1]) - self.prefix
        if self.per_image:
            r, threshold = patches // 2, self.tau
        else:
            r, threshold = patches - max(1, round(self.keep * patches)), None
        x, sizes, dest, valid = bipartite_merge(x, keys, state.sizes, r, self.prefix, threshold=threshold,
                                                valid=state.valid, need_dest=self.needs_dest)
        return x, sizes, valid, dest


def make_reducer(method: str, prefix: int, layers: Sequence[int], **knobs: Any) -> Reducer:
    """The reducer for ``method`` (drop, evit, tome)."""
    if method == "tome":
        return MergeReducer(prefix, layers, **knobs)
    return DropReducer(prefix, layers, fuse=method == "evit", **knobs)
