"""Recovering accuracy after pruning.

``reconstruct``: no retraining. Block by block, refit the output projection of every kept
attention and MLP sub-layer by ridge least squares so that the pruned model's residual stream
matches the dense model's on calibration images (the layer-wise reconstruction of Kwon et al.,
"A Fast Post-Training Pruning Framework for Transformers", with the residual error of earlier
blocks folded into each target) — label-free, as the targets are the dense model's activations.
``distill``: short knowledge distillation from the dense model, of its logits, or (label-free) of
its output features.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from vitrim.data.dataset import ImageSet
from vitrim.errors import ConfigError
from vitrim.models import VisionTransformer
from vitrim.progress import progress_bar
from vitrim.prune.saliency import FeatureDistance
from vitrim.train import TrainConfig, fit
from vitrim.train.loop import TrainLoss, distillation_loss


DISTILL_OBJECTIVES = ("labels", "features", "labels+features")


class NormalEquations:
    """Accumulates X^T X and X^T T (float64, on ``device``) for a linear layer with bias."""

    def __init__(self, n_in: int, n_out: int, device: torch.device | str | None = None) -> None:
        self.xtx = torch.zeros(n_in + 1, n_in + 1, dtype=torch.float64, device=device)
        self.xtt = torch.zeros(n_in + 1, n_out, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor, t: torch.Tensor) -> None:  # x (R, n_in), t (R, n_out)
        x = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64, device=x.device)], dim=1)
        self.xtx += x.t() @ x
        self.xtt += x.t() @ t.double()

    def all_reduce(self) -> "NormalEquations":
        """Sum X^T X and X^T T over the ranks (:mod:`vitrim.distributed`; a no-op in one process),
        so every rank solves the same system, that of every rank's rows together."""
        from vitrim import distributed

        distributed.all_reduce_sum(self.xtx)
        distributed.all_reduce_sum(self.xtt)
        return self

    def solve_into(self, layer: nn.Linear, damping: float) -> None:
        """Ridge solution pulled towards the layer's current weights."""
        w0 = torch.cat([layer.weight.detach().double().t(), layer.bias.detach().double()[None]], dim=0)
        lam = damping * self.xtx.diagonal().mean().clamp_min(1e-12)
        eye = torch.eye(self.xtx.shape[0], dtype=torch.float64, device=self.xtx.device)
        solution = torch.linalg.solve(self.xtx + lam * eye, self.xtt + lam * w0)  # (n_in + 1, n_out)
        layer.weight.copy_(solution[:-1].t().to(layer.weight.dtype))
        layer.bias.copy_(solution[-1].to(layer.bias.dtype))


def _layer_scale(module: nn.Module, like: torch.Tensor) -> torch.Tensor:
    return module.gamma.detach() if hasattr(module, "gamma") else torch.ones_like(like)


@torch.no_grad()
def reconstruct(dense: VisionTransformer, pruned: VisionTransformer, embed_index: list[int],
                images: torch.Tensor, *, batch_size: int = 64, damping: float = 1e-3,
                progress: bool = False) -> VisionTransformer:
    """Refit ``pruned``'s attention ``proj`` and MLP ``fc2`` layers in place (no gradients).

    ``embed_index``: for each embedding channel of ``pruned``, its channel in ``dense``.
    ``images``: calibration images (B, C, H, W), already normalised; they are moved to
    ``pruned``'s device (``dense`` must be on the same one). Under ``torchrun`` each rank passes
    its shard of the images and the normal equations are all-reduced before every solve, so every
    rank ends with the same weights.
    """
    dense.eval()
    pruned.eval()
    device = next(pruned.parameters()).device
    E = torch.tensor(embed_index, dtype=torch.long, device=device)
    chunks = images.to(device).split(batch_size)
    xd = [dense.embed(x) for x in chunks]  # dense residual streams (b, N, C_dense)
    xp = [pruned.embed(x) for x in chunks]  # pruned residual streams (b, N, C)
    pairs = list(zip(dense.blocks, pruned.blocks))
    for bd, bp in progress_bar(pairs, total=len(pairs), desc="reconstruct", enabled=progress):
        for branch in ("attention", "mlp"):
            has_dense = (bd.attn if branch == "attention" else bd.mlp) is not None
            has_pruned = (bp.attn if branch == "attention" else bp.mlp) is not None
            if has_dense:
                xd = [x + (bd.attention_branch(x) if branch == "attention" else bd.mlp_branch(x)) for x in xd]
            if not has_pruned:
                continue
            layer = bp.attn.proj if branch == "attention" else bp.mlp.fc2
            ls = bp.ls1 if branch == "attention" else bp.ls2
            eq = NormalEquations(layer.in_features, layer.out_features, device)
            for x_dense, x_pruned in zip(xd, xp):
                if branch == "attention":
                    hidden = bp.attn.mix(bp.norm1(x_pruned))
                else:
                    hidden = bp.mlp.hidden(bp.norm2(x_pruned))
                gamma = _layer_scale(ls, x_pruned[0, 0])
                target = (x_dense[..., E] - x_pruned) / gamma  # (b, N, C)
                eq.add(hidden.flatten(0, 1), target.flatten(0, 1))
            eq.all_reduce().solve_into(layer, damping)
            xp = [x + (bp.attention_branch(x) if branch == "attention" else bp.mlp_branch(x)) for x in xp]
    return pruned


def feature_distillation(teacher: VisionTransformer, embed_index: Sequence[int] | None = None, *,
                         with_logits: bool = False, temperature: float = 1.0) -> TrainLoss:
    """The training loss (for :func:`vitrim.train.fit`) of label-free distillation: the mean
    :class:`~vitrim.prune.saliency.FeatureDistance` from the student's output features to the
    (frozen, eval-mode) ``teacher``'s on the same batch. ``with_logits``: plus the KL divergence
    of the student's logits to the teacher's at ``temperature`` (both models classify)."""
    distance = FeatureDistance(embed_index)
    teacher.eval()

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            target_tokens = teacher.forward_features(x)  # (B, N, C_dense)
            target = (target_tokens, teacher.pooled(target_tokens))
        tokens = model.forward_features(x)  # (B, N, C)
        total = distance((tokens, model.pooled(tokens)), target).mean()
        if with_logits:
            with torch.no_grad():
                target_logits = teacher.classify(target_tokens).float()  # (B, classes)
            total = total + distillation_loss(model.classify(tokens).float(), target_logits, temperature)
        return total

    return loss


def distillation_config(*, epochs: int = 1, images: int | None = None, lr: float = 2e-4, batch_size: int = 128,
                        seed: int = 0, alpha: float = 1.0, temperature: float = 1.0,
                        augment: str = "none") -> TrainConfig:
    """The recovery's training recipe: ``epochs`` (capped at ``images``), 5% warm-up, then cosine
    from ``lr`` to a hundredth, weight decay 0.01, no label smoothing; ``alpha`` is the teacher's
    weight (below 1 mixes in the labels' cross-entropy), ``temperature`` its softening."""
    return TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, min_lr=lr * 0.01, warmup_epochs=0.05,
                       label_smoothing=0.0, weight_decay=0.01, distill_alpha=alpha, distill_temperature=temperature,
                       seed=seed, limit_train=images, augment=augment)


def distill(student: VisionTransformer, teacher: VisionTransformer, train_set: ImageSet, out_dir: str | Path,
            *, epochs: int = 1, images: int | None = None, lr: float = 2e-4, batch_size: int = 128,
            seed: int = 0, progress: bool = True, objective: str = "labels",
            embed_index: Sequence[int] | None = None, device: str | torch.device | None = None,
            alpha: float = 1.0, augment: str = "none") -> VisionTransformer:
    """Knowledge distillation for a budget of epochs or images, in place.

    ``objective="labels"``: KL to the teacher's logits, weighted ``alpha``, plus the labels'
    cross-entropy weighted ``1 - alpha`` (``alpha`` below 1 needs ``train_set`` labelled for the
    student's classes). ``"features"``: the :class:`~vitrim.prune.saliency.FeatureDistance` to the
    teacher's output tokens and pooled embedding, with ``embed_index`` the teacher channel of each
    student channel (``None``: the same); no labels, so ``alpha`` must be 1. ``"labels+features"``:
    the sum of the logits' KL and that distance. ``augment``: the training images' augmentation
    (``"none"``, or a comma-separated subset of ``"crop"`` and ``"flip"``). ``device``: where
    student, teacher and batches run (``None``: the student's).
    """
    cfg = distillation_config(epochs=epochs, images=images, lr=lr, batch_size=batch_size, seed=seed, alpha=alpha,
                              augment=augment)
    if objective not in DISTILL_OBJECTIVES:
        raise ConfigError(f"unknown distillation objective {objective!r}; use one of {', '.join(DISTILL_OBJECTIVES)}")
    if objective != "labels" and alpha < 1:
        raise ConfigError(f"alpha={alpha:g} mixes the labels' cross-entropy into the logits' distillation; the "
                          f"{objective!r} objective has its own loss, so pass alpha=1")
    loss_fn = (feature_distillation(teacher, embed_index, with_logits=objective == "labels+features")
               if objective != "labels" else None)
    fit(student, train_set, cfg, out_dir, teacher=None if loss_fn is not None else teacher,
        image_size=student.config.image_size, progress=progress, loss_fn=loss_fn, device=device)
    return student.eval()
