"""A trained ViT whose token count adapts at run time: one knob, changed between calls."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vitrim.errors import ConfigError
from vitrim.models import VisionTransformer
from vitrim.tokens.reducers import Reducer, make_reducer

METHODS = ("drop", "evit", "tome")


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


class TokenReducedViT(nn.Module):
    """Wraps a :class:`VisionTransformer`; reduces tokens after the blocks in ``layers``.

    The wrapped model's own forward runs with a reducer (:mod:`.reducers`) called between blocks,
    so everything the model does (drop-path, LayerScale, q/k norm, registers) applies unchanged.
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
        self.model, self.method, self.layers = model, method, layers
        self.reducer = self.make_reducer(method, layers, keep=keep, tau=tau, mode=mode)
        self.train_keep = None if train_keep is None else check_train_keep(train_keep)
        self.sandwich = sandwich

    def make_reducer(self, method: str, layers: tuple[int, ...], **knobs) -> Reducer:
        return make_reducer(method, self.model.num_prefix_tokens, layers, **knobs)

    @property
    def config(self):
        return self.model.config

    @property
    def mode(self) -> str:
        return self.reducer.mode

    @mode.setter
    def mode(self, value: str) -> None:
        self.reducer.mode = value

    @property
    def keep(self) -> float:
        return self.reducer.keep

    @keep.setter
    def keep(self, value: float) -> None:
        self.reducer.keep = value

    @property
    def tau(self) -> float | None:
        return self.reducer.tau

    @tau.setter
    def tau(self, value: float | None) -> None:
        self.reducer.tau = value

    @property
    def last_token_counts(self) -> list[float]:
        """The token count every block saw in the last call (batch mean in dynamic mode)."""
        return self.reducer.counts

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Initial tokens (B, N, C)."""
        return self.model.embed(images)

    def embedding_flops(self) -> float:
        """FLOPs per image spent turning pixels into tokens in the last call."""
        from vitrim.bench.flops import embedding_cost

        return float(embedding_cost(self.config).flops)

    def reduces_after(self, block: int) -> bool:
        """Whether tokens are reduced after ``block`` with the current knobs."""
        return self.reducer.reduces_after(block)

    def forward_features(self, images: torch.Tensor, restore: bool = False):
        """Normalised tokens (B, N', C) and their :class:`~vitrim.models.tokens.TokenState`.

        With ``restore``, the normalised full grid (B, prefix + patches, C) and None instead: kept
        tokens scattered back to their patches, fused or merged patches filled from the token they
        went into, dropped patches from their last state before they were dropped.
        """
        x = self.embed(images)
        self.reducer.start(x, track=restore)
        tokens, state = self.model.forward_tokens(x, self.reducer, normalize=not restore)
        if restore:
            return self.model.final_norm(self.reducer.restore(tokens)), None
        return tokens, state

    def forward_intermediates(self, images: torch.Tensor, indices: Sequence[int] | None = None, *,
                              norm: bool = True) -> list[torch.Tensor]:
        """Full-grid feature maps ``(B, C, G, G)`` after the blocks in ``indices`` for a dense head:
        the reduced tokens are restored to their patches (merge, then unmerge), so a detection or
        segmentation head sees the grid it was built for. See
        :meth:`vitrim.models.VisionTransformer.forward_intermediates`."""
        x = self.embed(images)
        self.reducer.start(x, track=True)
        maps: list[torch.Tensor] = []
        wanted = self.model.block_indices(indices)

        def grab(i: int, tokens: torch.Tensor) -> None:
            if i in wanted:
                grid = self.reducer.restore(tokens)
                maps.append(self.model.grid_map(self.model.norm(grid) if norm else grid))

        self.model.forward_tokens(x, self.reducer, normalize=False, after_block=grab)
        return maps

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, in, H, W) -> (B, classes)
        if not (self.training and self.mode == "static" and self.train_keep is not None):
            return self.classify_images(images)
        low, high = self.train_keep
        chosen, half = self.keep, images.shape[0] // 2 if self.sandwich else 0
        parts = []
        try:
            if half:  # the top of the range on half the batch
                self.keep = high
                parts.append(self.classify_images(images[:half]))
            self.keep = low + (high - low) * float(torch.rand(()))
            parts.append(self.classify_images(images[half:]))
        finally:
            self.keep = chosen
        return torch.cat(parts)

    def classify_images(self, images: torch.Tensor) -> torch.Tensor:  # (B, in, H, W) -> (B, classes)
        tokens, state = self.forward_features(images)
        return self.model.classify(tokens, state)


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
