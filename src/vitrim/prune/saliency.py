"""Saliency of every prunable structure, in loss units, from one backward pass per batch.

Each structure carries a per-sample gate ``g`` (all ones). The gradient of the summed loss
with respect to sample b's gate is that sample's ``dl_b/dg``, so one backward pass scores every
structure of every kind at once:

- ``fisher``: 0.5 * mean_b (dl_b/dg)^2 — the Gauss-Newton/Fisher estimate of the second-order
  loss increase when the gate goes from 1 to 0 (NViT's criterion);
- ``taylor``: |mean_b dl_b/dg| — the first-order estimate;
- ``taylor2``: -mean_b dl_b/dg + 0.5 * mean_b (dl_b/dg)^2 — first-order term plus the Fisher
  second-order term (useful when the model is not at a minimum of the calibration loss);
- ``magnitude``: the L2 norm of the weights the structure owns (not in loss units; a baseline).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from vitrim.errors import ConfigError, DataError
from vitrim.models import VisionTransformer
from vitrim.progress import progress_bar
from vitrim.prune.gates import gate_shapes, gated, kind_of

METHODS = ("fisher", "taylor", "taylor2", "magnitude")
GRADIENT_METHODS = ("fisher", "taylor", "taylor2")
Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (output, target) -> per-sample loss (B,)


def classification_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target, reduction="none")


class SaliencyAccumulator:
    """Running per-structure sums of dl/dg and (dl/dg)^2 over samples."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.first = {k: torch.zeros(s, dtype=torch.float64) for k, s in shapes.items()}
        self.second = {k: torch.zeros(s, dtype=torch.float64) for k, s in shapes.items()}
        self.count = 0

    def add(self, grads: dict[str, torch.Tensor]) -> None:
        """``grads[key]``: per-sample gate gradients (B, *shape)."""
        for key, g in grads.items():
            g = g.detach().double()
            self.first[key] += g.sum(0)
            self.second[key] += (g * g).sum(0)
        self.count += next(iter(grads.values())).shape[0]

    def scores(self, method: str) -> dict[str, torch.Tensor]:
        """Estimated loss increase per structure when its gate goes from 1 to 0."""
        if self.count == 0:
            raise DataError("no calibration samples were seen")
        n = self.count
        if method == "fisher":
            return {k: 0.5 * s / n for k, s in self.second.items()}
        if method == "taylor":
            return {k: (s / n).abs() for k, s in self.first.items()}
        return {k: 0.5 * self.second[k] / n - self.first[k] / n for k in self.first}  # taylor2


def gradient_saliency(model: VisionTransformer, batches: Iterable[Batch], method: str = "fisher",
                      loss_fn: LossFn = classification_loss, kinds: Iterable[str] | None = None,
                      progress: bool = False, total: int | None = None) -> dict[str, torch.Tensor]:
    """Gradient saliency (fisher | taylor | taylor2) of every gate key (restricted to ``kinds`` if given)."""
    if method not in GRADIENT_METHODS:
        raise ConfigError(f"unknown gradient saliency {method!r}; use one of {', '.join(GRADIENT_METHODS)}")
    return accumulate_gradients(model, batches, loss_fn, kinds, progress, total).scores(method)


def accumulate_gradients(model: VisionTransformer, batches: Iterable[Batch], loss_fn: LossFn = classification_loss,
                         kinds: Iterable[str] | None = None, progress: bool = False,
                         total: int | None = None) -> SaliencyAccumulator:
    """One pass over ``batches``: per-sample gate gradients summed for every gradient method."""
    shapes = gate_shapes(model.config)
    if kinds is not None:
        wanted = set(kinds)
        shapes = {k: s for k, s in shapes.items() if kind_of(k) in wanted}
    acc = SaliencyAccumulator(shapes)
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    dtype = params[0].dtype if params else torch.float32
    for p in params:
        p.requires_grad_(False)
    try:
        for x, y in progress_bar(batches, total=total, desc="saliency", enabled=progress):
            gates = {k: torch.ones((x.shape[0],) + s, dtype=dtype, requires_grad=True) for k, s in shapes.items()}
            with gated(model, gates):
                losses = loss_fn(model(x), y)
            if losses.ndim != 1 or losses.shape[0] != x.shape[0]:
                raise ConfigError(f"loss_fn must return one loss per sample, shape ({x.shape[0]},), "
                                  f"got {tuple(losses.shape)}")
            grads = torch.autograd.grad(losses.sum(), list(gates.values()), allow_unused=True)
            acc.add({k: (g if g is not None else torch.zeros_like(gates[k]))
                     for k, g in zip(gates, grads)})
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    return acc


@torch.no_grad()
def magnitude_saliency(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """L2 norm of the weights each structure owns."""
    cfg = model.config
    scores: dict[str, torch.Tensor] = {}
    embed = torch.zeros(cfg.embed_dim, dtype=torch.float64)
    for i, (block, d) in enumerate(zip(model.blocks, cfg.blocks)):
        if d.attention:
            H, qk, v = d.heads, d.qk_dim, d.v_dim
            w = block.attn.qkv.weight.double()
            q = w[: H * qk].view(H, qk, -1)
            k = w[H * qk : 2 * H * qk].view(H, qk, -1)
            val = w[2 * H * qk :].view(H, v, -1)
            proj = block.attn.proj.weight.double().t().reshape(H, v, -1)  # (H, v, C)
            qk_norm = (q.pow(2).sum(-1) + k.pow(2).sum(-1)).sqrt()  # (H, qk)
            v_norm = (val.pow(2).sum(-1) + proj.pow(2).sum(-1)).sqrt()  # (H, v)
            scores[f"{i}.qk"], scores[f"{i}.v"] = qk_norm, v_norm
            scores[f"{i}.heads"] = (qk_norm.pow(2).sum(-1) + v_norm.pow(2).sum(-1)).sqrt()
            scores[f"{i}.attn_layer"] = scores[f"{i}.heads"].pow(2).sum().sqrt()
            embed += block.attn.proj.weight.double().pow(2).sum(1)
        if d.mlp:
            fc1, fc2 = block.mlp.fc1.weight.double(), block.mlp.fc2.weight.double()
            scores[f"{i}.mlp"] = (fc1.pow(2).sum(1) + fc2.pow(2).sum(0)).sqrt()
            scores[f"{i}.mlp_layer"] = scores[f"{i}.mlp"].pow(2).sum().sqrt()
            embed += fc2.pow(2).sum(1)
    embed += model.patch_embed.proj.weight.double().flatten(1).pow(2).sum(1)
    scores["embed"] = embed.sqrt()
    return scores


def saliency(model: VisionTransformer, batches: Iterable[Batch] | None, method: str = "fisher",
             **kwargs) -> dict[str, torch.Tensor]:
    """Saliency of every structure by ``method`` (fisher | taylor | taylor2 | magnitude)."""
    if method not in METHODS:
        raise ConfigError(f"unknown saliency {method!r}; use one of {', '.join(METHODS)}")
    if method == "magnitude":
        return magnitude_saliency(model)
    if batches is None:
        raise DataError(f"{method} saliency needs calibration batches")
    return gradient_saliency(model, batches, method, **kwargs)
