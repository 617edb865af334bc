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

The loss is the classification loss on labelled images, or — for a backbone, or images without
labels — the :class:`FeatureDistance` from the model's output features to the dense model's.
That distance is 0, with a zero gradient, at the dense model, so the squared gradients would be
zero too; for the second-order methods each sample's target is instead drawn from the Gaussian
the normalised squared error is the likelihood of (the "true" Fisher, as sampling a label from
the predicted distribution is for cross-entropy): ``0.5 * mean_b (dl_b/dg)^2`` then estimates
the Gauss-Newton loss increase ``|| d features / dg ||^2`` in the distance's own units.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from vitrim.data.dataset import ImageSet
from vitrim.errors import ConfigError, DataError
from vitrim.models import VisionTransformer
from vitrim.progress import progress_bar
from vitrim.prune.gates import gate_shapes, gated, kind_of

METHODS = ("fisher", "taylor", "taylor2", "magnitude")
GRADIENT_METHODS = ("fisher", "taylor", "taylor2")
SECOND_ORDER = ("fisher", "taylor2")  # the methods that read squared gradients
Batch = tuple[torch.Tensor, Any]  # images (B, C, H, W) and the loss's target (labels (B,), or dense features)
LossFn = Callable[[Any, Any], torch.Tensor]  # (output, target) -> per-sample loss (B,)
Forward = Callable[[VisionTransformer, torch.Tensor], Any]  # (model, images) -> the output a LossFn reads
BatchLoss = Callable[[Any, Batch], torch.Tensor]  # (model, (images, targets)) -> the batch's mean loss, a scalar
Features = tuple[torch.Tensor, torch.Tensor]  # output tokens (B, N, C) and pooled embedding (B, C)
UNLABELLED = ("the calibration images carry no labels but the classification loss needs them; use "
              "objective='features' (--objective features), or labelled images (DIR/<class>/<image>)")


def classification_loss(logits: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Per-sample cross-entropy (B,) of ``logits`` (B, classes) against labels ``target`` (B,)."""
    if target is None:
        raise DataError(UNLABELLED)
    return F.cross_entropy(logits, target, reduction="none")


def output_features(model: VisionTransformer, x: torch.Tensor) -> Features:
    """What a backbone outputs: the tokens of ``forward_features`` (B, N, C) and the pooled
    embedding (B, C) — ``pool(tokens)``, normalised by ``norm`` when ``config.fc_norm``."""
    tokens = model.forward_features(x)  # (B, N, C)
    pooled = model.pool(tokens)  # (B, C)
    return tokens, (model.norm(pooled) if model.config.fc_norm else pooled)


class FeatureDistance:
    """Per-sample distance (B,) from a model's :func:`output_features` to the dense model's.

    The sum of two normalised mean squared errors, tokens and pooled embedding, each divided by
    the dense features' mean square over the batch, so either is 1 for an all-zero output.
    ``embed_index``: for each embedding channel of the (pruned) model, its channel in the dense
    one (``None``: the same channels); a dense channel the model lacks counts as lost, its
    dense value the error. ``generator``: draw each sample's target around the dense features
    (see the module docstring) — for second-order saliency only; the distance's value then is
    not the distance.
    """

    def __init__(self, embed_index: Sequence[int] | None = None, generator: torch.Generator | None = None) -> None:
        self.embed_index = torch.tensor(list(embed_index), dtype=torch.long) if embed_index is not None else None
        self.generator = generator

    def widen(self, out: torch.Tensor, width: int) -> torch.Tensor:
        """``out`` (..., C) in the dense model's ``width`` channels, zero where a channel was removed."""
        if self.embed_index is None:
            if out.shape[-1] != width:
                raise ConfigError(f"features {out.shape[-1]} wide cannot be compared with dense features {width} "
                                  f"wide; pass embed_index, the dense channel of each kept channel")
            return out
        if out.shape[-1] != len(self.embed_index):
            raise ConfigError(f"embed_index names {len(self.embed_index)} channels but the features are "
                              f"{out.shape[-1]} wide; pass the embed_index of this pruned model")
        return out.new_zeros(out.shape[:-1] + (width,)).index_copy(-1, self.embed_index.to(out.device), out)

    def __call__(self, output: Features, target: Features) -> torch.Tensor:
        total = torch.zeros((), device=output[0].device)
        for out, ref in zip(output, target):  # tokens (B, N, C), then pooled (B, C)
            ref = ref.float()
            err = self.widen(out.float(), ref.shape[-1]) - ref
            scale = ref.pow(2).mean().clamp_min(1e-12)  # the dense features' mean square
            dims = tuple(range(1, err.ndim))
            loss = err.pow(2).mean(dims) / scale  # (B,)
            if self.generator is not None:  # target ref + sigma * noise, sigma^2 = numel * scale / 2
                # drawn on the CPU generator, so the probe is the same on every device
                noise = torch.randn(err.shape, generator=self.generator, dtype=err.dtype).to(err.device)
                loss = loss - (noise * err).sum(dims) * torch.sqrt(2 / (err[0].numel() * scale))
            total = total + loss
        return total


class SaliencyAccumulator:
    """Running per-structure sums of dl/dg and (dl/dg)^2 over samples (float64, on ``device``)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], device: torch.device | str | None = None) -> None:
        self.first = {k: torch.zeros(s, dtype=torch.float64, device=device) for k, s in shapes.items()}
        self.second = {k: torch.zeros(s, dtype=torch.float64, device=device) for k, s in shapes.items()}
        self.count = 0

    def all_reduce(self) -> "SaliencyAccumulator":
        """Sum the accumulators and the sample count over every rank (:mod:`vitrim.distributed`), so
        every rank scores the structures on all calibration images; a no-op in one process."""
        from vitrim import distributed

        if distributed.world_size() == 1:
            return self
        keys = list(self.first)
        flat = torch.cat([self.first[k].reshape(-1) for k in keys] + [self.second[k].reshape(-1) for k in keys]
                         + [torch.tensor([float(self.count)], dtype=torch.float64, device=self._device())])
        distributed.all_reduce_sum(flat)
        offset = 0
        for table in (self.first, self.second):
            for k in keys:
                n = table[k].numel()
                table[k] = flat[offset:offset + n].view(table[k].shape).clone()
                offset += n
        self.count = int(round(float(flat[-1])))
        return self

    def _device(self) -> torch.device:
        return next(iter(self.first.values())).device if self.first else torch.device("cpu")

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


@torch.no_grad()
def feature_distance(model: VisionTransformer, dense: VisionTransformer, data: ImageSet | torch.Tensor, *,
                     embed_index: Sequence[int] | None = None, batch_size: int = 64) -> float:
    """Mean :class:`FeatureDistance` of ``model``'s output features from ``dense``'s over ``data``
    (an :class:`ImageSet`, or normalised images (B, C, H, W)); 0 when they agree."""
    was = model.training, dense.training
    model.eval()
    dense.eval()
    distance = FeatureDistance(embed_index)
    chunks = (data.split(batch_size) if isinstance(data, torch.Tensor)
              else [x for x, _ in data.batches(batch_size, image_size=dense.config.image_size)])
    try:
        total = torch.cat([distance(output_features(model, x), output_features(dense, x)) for x in chunks])
    finally:
        model.train(was[0])
        dense.train(was[1])
    return float(total.mean())


def gradient_saliency(model: VisionTransformer, batches: Iterable[Batch], method: str = "fisher",
                      loss_fn: LossFn = classification_loss, kinds: Iterable[str] | None = None,
                      progress: bool = False, total: int | None = None,
                      forward: Forward | None = None, batch_loss: BatchLoss | None = None) -> dict[str, torch.Tensor]:
    """Gradient saliency (fisher | taylor | taylor2) of every gate key (restricted to ``kinds`` if given)."""
    if method not in GRADIENT_METHODS:
        raise ConfigError(f"unknown gradient saliency {method!r}; use one of {', '.join(GRADIENT_METHODS)}")
    return accumulate_gradients(model, batches, loss_fn, kinds, progress, total, forward, batch_loss).scores(method)


def accumulate_gradients(model: VisionTransformer, batches: Iterable[Batch], loss_fn: LossFn = classification_loss,
                         kinds: Iterable[str] | None = None, progress: bool = False,
                         total: int | None = None, forward: Forward | None = None,
                         batch_loss: BatchLoss | None = None) -> SaliencyAccumulator:
    """One pass over ``batches``: per-sample gate gradients summed for every gradient method.

    ``loss_fn(forward(model, x), target)`` is each batch's per-sample loss; ``forward`` defaults
    to the logits ``model(x)`` (with :func:`output_features` and a :class:`FeatureDistance`, the
    batches' targets are the dense model's features).

    ``batch_loss(model, (x, target))``, when given, replaces both: the batch's *mean* loss, a
    scalar. Each sample still has its own gates, so the gradient of ``B * mean`` with respect to
    sample b's gate is that sample's ``dl_b/dg`` exactly when the samples do not interact (a ViT
    without batch statistics) and the mean is over per-sample terms; a loss normalised otherwise
    (e.g. by the objects of the whole batch) weights each sample by that batch's normaliser.
    """
    shapes = gate_shapes(model.config)
    if kinds is not None:
        wanted = set(kinds)
        shapes = {k: s for k, s in shapes.items() if kind_of(k) in wanted}
    params = [p for p in model.parameters()]
    device = params[0].device if params else torch.device("cpu")
    acc = SaliencyAccumulator(shapes, device)
    was_training = model.training
    model.eval()
    flags = [p.requires_grad for p in params]
    dtype = params[0].dtype if params else torch.float32
    for p in params:
        p.requires_grad_(False)
    try:
        for x, y in progress_bar(batches, total=total, desc="saliency", enabled=progress):
            x, y = x.to(device), target_to(y, device)
            gates = {k: torch.ones((x.shape[0],) + s, dtype=dtype, device=device, requires_grad=True)
                     for k, s in shapes.items()}
            with gated(model, gates):
                if batch_loss is not None:
                    total_loss = _batch_total(batch_loss(model, (x, y)), x.shape[0])
                else:
                    losses = loss_fn(forward(model, x) if forward is not None else model(x), y)
                    if losses.ndim != 1 or losses.shape[0] != x.shape[0]:
                        raise ConfigError(f"loss_fn must return one loss per sample, shape ({x.shape[0]},), "
                                          f"got {tuple(losses.shape)}")
                    total_loss = losses.sum()
            if not total_loss.requires_grad:
                raise ConfigError("the loss does not depend on the model being pruned (no gradient reaches it); "
                                  "compute it from the model's output on the batch's images")
            grads = torch.autograd.grad(total_loss, list(gates.values()), allow_unused=True)
            if all(g is None for g in grads):
                raise ConfigError("the loss does not pass through the model being pruned (no gradient reaches its "
                                  "structures); compute it from the model it is given, not from another copy")
            acc.add({k: (g if g is not None else torch.zeros_like(gates[k]))
                     for k, g in zip(gates, grads)})
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    return acc.all_reduce()


def _batch_total(loss: Any, size: int) -> torch.Tensor:
    """A batch-mean ``loss`` (a scalar tensor) as the sum of its ``size`` per-sample losses."""
    if not torch.is_tensor(loss) or loss.numel() != 1:
        shape = tuple(loss.shape) if torch.is_tensor(loss) else type(loss).__name__
        raise ConfigError(f"loss(model, batch) must return the batch's mean loss as a scalar tensor, got {shape}; "
                          f"reduce it with .mean()")
    return loss.reshape(()) * size


def target_to(target: Any, device: torch.device) -> Any:
    """A loss target (labels, a tuple of feature tensors, a list of per-image dicts, or None) on ``device``."""
    if torch.is_tensor(target):
        return target.to(device)
    if isinstance(target, (tuple, list)):
        return type(target)(target_to(t, device) for t in target)
    if isinstance(target, dict):
        return {k: target_to(v, device) for k, v in target.items()}
    return target


@torch.no_grad()
def magnitude_saliency(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """L2 norm of the weights each structure owns."""
    cfg = model.config
    scores: dict[str, torch.Tensor] = {}
    embed = torch.zeros(cfg.embed_dim, dtype=torch.float64, device=model.patch_embed.proj.weight.device)
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
    """Saliency of every structure by ``method`` (fisher | taylor | taylor2 | magnitude), on the CPU.

    The gradient methods run where ``model`` is (batches are moved there) and, under ``torchrun``,
    sum their accumulators over the ranks, each of which saw its shard of the batches."""
    if method not in METHODS:
        raise ConfigError(f"unknown saliency {method!r}; use one of {', '.join(METHODS)}")
    if method == "magnitude":
        return {k: v.cpu() for k, v in magnitude_saliency(model).items()}
    if batches is None:
        raise DataError(f"{method} saliency needs calibration batches")
    # the search runs on the CPU, whatever device the scores were accumulated on
    return {k: v.cpu() for k, v in gradient_saliency(model, batches, method, **kwargs).items()}
