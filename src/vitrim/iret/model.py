"""The incremental-resolution ViT: coarse tokens first, detail only where the class token looks.

Every patch enters as a *coarse* token embedded from its low band (LL) of a one-level 2-D
lifting scheme — a quarter of the pixels' values. After block ``detail_layer`` the class
token's attention ranks the patches; the most-attended ones receive their three detail bands
(LH, HL, HH) through a second embedding, added to their token, and the rest are dropped. The
knob is the same as :class:`~vitrim.tokens.TokenReducedViT`'s: ``keep`` (static, one count per
batch) or ``tau`` (dynamic, the share of attention the kept patches must cover, per image).

Built from a trained ViT (:func:`incremental_from_vit`), the two embeddings start as the exact
split of its patch embedding over the bands, so a short fine-tune (``vitrim train --arch iret``)
adapts the blocks to coarse tokens; in training mode each batch draws its own keep ratio, so one
set of weights serves the whole knob range.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitrim.errors import ConfigError
from vitrim.iret.lifting import Lifting2D
from vitrim.models import VisionTransformer
from vitrim.tokens.model import TokenReducedViT, check_train_keep
from vitrim.tokens.reducers import DropReducer, Reducer


class DetailReducer(DropReducer):
    """Drops after ``detail_layer`` even when every patch is kept: the details arrive there —
    unless they arrived with the embedding (``detailed_at_embedding``)."""

    detailed_at_embedding = False

    def reduces_after(self, block: int) -> bool:
        return block in self.layers and not self.detailed_at_embedding


@dataclass(frozen=True)
class IretOptions:
    """``detail_layer``: the block after which details arrive and tokens are dropped (0-based);
    ``kernel``: lifting filter length; ``learnable``: train the lifting filters (else fixed Haar);
    ``train_keep``: range of the keep ratio drawn per training batch; ``detail_mixer``: add, to the
    linear detail embedding, a small MLP of (token, detail embedding) — the tokens have been
    through ``detail_layer + 1`` blocks when their detail arrives, and the mixer can adapt the
    detail to them (starts at zero, so the model starts as without it); ``sandwich``: half of each
    training batch at the top of ``train_keep`` (see :class:`~vitrim.tokens.TokenReducedViT`);
    ``dense_top``: at ``keep=1`` (static) every patch receives its detail at the embedding
    instead of after ``detail_layer``, so the top of the knob runs as the dense ViT the model was
    built from (exactly, before fine-tuning) and costs no more than it; train it with
    ``sandwich`` (and ``train_keep`` reaching 1) so that path keeps being trained."""

    detail_layer: int = 1
    kernel: int = 3
    learnable: bool = True
    train_keep: tuple[float, float] = (0.1, 1.0)
    detail_mixer: bool = False
    sandwich: bool = False
    dense_top: bool = False

    def __post_init__(self) -> None:
        check_train_keep(self.train_keep)
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ConfigError(f"the lifting kernel length must be odd and positive, got {self.kernel}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "train_keep": list(self.train_keep)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "IretOptions":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown incremental-resolution options: {', '.join(sorted(unknown))}")
        data = dict(data)
        if "train_keep" in data:
            data["train_keep"] = tuple(data["train_keep"])
        return cls(**data)


def patchify(bands: torch.Tensor, size: int) -> torch.Tensor:
    """(B, K, H', W') band images -> (B, P, K * size * size): one row per ``size`` x ``size`` patch."""
    B, K, H, W = bands.shape
    gh, gw = H // size, W // size
    x = bands.view(B, K, gh, size, gw, size).permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, K, s, s)
    return x.reshape(B, gh * gw, K * size * size)


class DetailMixer(nn.Module):
    """``MLP([norm(token), detail])`` -> (B, N, C): what to add beyond the linear detail embedding.
    The output layer starts at zero."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(2 * dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, tokens: torch.Tensor, detail: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(self.fc1(torch.cat([self.norm(tokens), detail], dim=-1)))
        return self.fc2(hidden)

    def flops(self) -> float:
        """Matrix-product FLOPs per token."""
        dim = self.fc2.in_features
        return float(2 * (2 * dim * dim + dim * dim))


class IncrementalViT(TokenReducedViT):
    """A ViT that starts from coarse tokens and adds detail where its class token attends.

    Wraps a canonical :class:`VisionTransformer` whose patch embedding it replaces (the wrapped
    model's ``patch_embed`` becomes ``None``). ``keep=1`` gives every patch its detail.
    """

    def __init__(self, model: VisionTransformer, options: IretOptions | None = None, *, keep: float = 1.0,
                 tau: float | None = None, mode: str = "static") -> None:
        options = options or IretOptions()
        cfg = model.config
        if cfg.patch_size % 2:
            raise ConfigError(f"the incremental-resolution ViT halves each patch; patch size {cfg.patch_size} "
                              f"is odd")
        if not cfg.class_token:
            raise ConfigError("the incremental-resolution ViT ranks patches by the class token's attention, "
                              "and this model has no class token")
        if not 0 <= options.detail_layer < cfg.depth - 1:
            raise ConfigError(f"detail_layer {options.detail_layer} must leave at least one block after it "
                              f"(0..{cfg.depth - 2} for depth {cfg.depth})")
        super().__init__(model, "drop", layers=(options.detail_layer,), keep=keep, tau=tau, mode=mode,
                         train_keep=options.train_keep, sandwich=options.sandwich)
        self.options = options
        half = cfg.patch_size // 2
        band = cfg.in_chans * half * half
        self.lifting = Lifting2D(cfg.in_chans, options.kernel, options.learnable)
        self.coarse_embed = nn.Linear(band, cfg.embed_dim)  # from LL
        self.detail_embed = nn.Linear(3 * band, cfg.embed_dim)  # from LH, HL, HH
        self.detail_mixer = DetailMixer(cfg.embed_dim, cfg.norm_eps) if options.detail_mixer else None
        model.patch_embed = None
        self._kept_patches = float(cfg.num_patches)

    def make_reducer(self, method: str, layers: tuple[int, ...], **knobs) -> Reducer:
        return DetailReducer(self.model.num_prefix_tokens, layers, refine=self.add_details, **knobs)

    @property
    def details_at_embedding(self) -> bool:
        """Whether the next forward gives every patch its detail at the embedding (``dense_top``
        at ``keep=1``)."""
        return self.options.dense_top and not self.reducer.per_image and self.keep >= 1

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Coarse tokens (B, N, C), the detail bands waiting for :meth:`add_details`; with
        :attr:`details_at_embedding`, every patch's full embedding instead."""
        self.model.check_input(images)
        half = self.config.patch_size // 2
        ll, details = self.lifting(images)  # (B, in, H/2, W/2), (B, 3 in, H/2, W/2)
        tokens = self.coarse_embed(patchify(ll, half))  # (B, P, C)
        self._details = patchify(details, half)  # (B, P, 3 in s s)
        full = self.details_at_embedding
        self.reducer.detailed_at_embedding = full
        if full:
            tokens = tokens + self.detail_embed(self._details)
            self._kept_patches = float(tokens.shape[1])
        return self.model.add_prefix_and_position(tokens)

    def add_details(self, x: torch.Tensor, dest: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """The kept patches' tokens plus their embedded detail bands (the reducer's refine hook)."""
        details = self._details
        prefix = self.model.num_prefix_tokens
        B, N, _ = x.shape
        P = details.shape[1]
        moved = dest[:, prefix:]  # (B, P): each patch's new slot, -1 if dropped
        slot = torch.where(moved >= 0, moved, N)  # dropped patches go to a spare slot
        source = torch.full((B, N + 1), -1, dtype=torch.long, device=x.device)
        source.scatter_(1, slot, torch.arange(P, device=x.device).expand(B, -1))
        source = source[:, prefix:N]  # (B, N - prefix): which patch each slot holds
        present = source >= 0
        picked = details.gather(1, source.clamp_min(0).unsqueeze(-1).expand(-1, -1, details.shape[-1]))
        added = self.detail_embed(picked)  # (B, N - prefix, C)
        if self.detail_mixer is not None:
            added = added + self.detail_mixer(x[:, prefix:], added)
        added = added * present.unsqueeze(-1).to(x.dtype)
        self._kept_patches = float(present.sum(1).float().mean())
        return torch.cat([x[:, :prefix], x[:, prefix:] + added], dim=1)

    def embedding_flops(self) -> float:
        cfg = self.config
        band = cfg.in_chans * (cfg.patch_size // 2) ** 2
        pixels = cfg.in_chans * cfg.image_size ** 2
        mixed = 0.0 if self.reducer.detailed_at_embedding else self._kept_patches  # no mixer at the embedding
        lifting = 2 * 2 * self.options.kernel * pixels  # predict + update along rows, then columns
        return float(2 * cfg.num_patches * band * cfg.embed_dim
                     + 2 * self._kept_patches * 3 * band * cfg.embed_dim + lifting
                     + (mixed * self.detail_mixer.flops() if self.detail_mixer is not None else 0))


@torch.no_grad()
def split_patch_embedding(vit: VisionTransformer, iret: IncrementalViT) -> None:
    """Set ``iret``'s coarse and detail embeddings so that, with the lifting as initialised,
    coarse(LL) + detail(LH, HL, HH) equals ``vit``'s patch embedding of the same patch exactly."""
    cfg = vit.config
    p, c = cfg.patch_size, cfg.in_chans
    basis = torch.eye(c * p * p, device=vit.pos_embed.device).view(-1, c, p, p)  # every one-pixel patch
    ll, details = iret.lifting(basis)
    half = p // 2
    bands = torch.cat([patchify(ll, half)[:, 0], patchify(details, half)[:, 0]], dim=1)  # (cpp, cpp)
    weight = vit.patch_embed.proj.weight.reshape(cfg.embed_dim, -1)  # (C, cpp)
    split = weight @ torch.linalg.inv(bands.T.double()).float()  # W · M^-1, M maps pixels to bands
    band = c * half * half
    iret.coarse_embed.weight.copy_(split[:, :band])
    iret.coarse_embed.bias.copy_(vit.patch_embed.proj.bias)
    iret.detail_embed.weight.copy_(split[:, band:])
    iret.detail_embed.bias.zero_()


def incremental_from_vit(vit: VisionTransformer, options: IretOptions | None = None, **knobs: Any) -> IncrementalViT:
    """An incremental-resolution ViT initialised from a trained canonical ViT (which is not modified)."""
    if not isinstance(vit, VisionTransformer):
        raise ConfigError(f"the incremental-resolution ViT is built from a vitrim ViT, got {type(vit).__name__}")
    if vit.patch_embed is None:
        raise ConfigError("this ViT has no patch embedding to start from")
    iret = IncrementalViT(copy.deepcopy(vit), options, **knobs)
    split_patch_embedding(vit, iret)
    return iret.eval()
