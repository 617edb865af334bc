"""Prune a dense model's backbone by the task's own loss (SiDT's regime): Fisher saliency of the
segmentation or detection loss through the whole model, the global search and the backbone's
layer-wise reconstruction, the feature pyramid and head kept as they are.

The embedding width is kept (the pyramid reads it), so the structures are heads, MLP units and
whole sub-layers unless ``structures`` says otherwise. Distillation (``recover="kd"`` or
``"reconstruct+kd"``) matches the dense model's feature map and head outputs, not class logits.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitrim.dense.detection import detection_loss
from vitrim.dense.train import dense_train_config, indexed
from vitrim.errors import ConfigError
from vitrim.models.dense import DenseModel
from vitrim.prune.saliency import target_to

BACKBONE_STRUCTURES = ("heads", "qk", "v", "mlp", "attn_layer", "mlp_layer")


def task_head(model: DenseModel) -> DenseModel:
    """A dense model with copies of ``model``'s pyramid and head (in eval mode) and no backbone yet:
    :func:`on_backbone` gives it the backbone being pruned. ``model`` is left as it is."""
    twin = DenseModel.__new__(DenseModel)
    nn.Module.__init__(twin)
    twin.pyramid, twin.head = copy.deepcopy(model.pyramid).eval(), copy.deepcopy(model.head).eval()
    twin.dense, twin.backbone, twin.training = model.dense, None, False
    return twin.use_reduced(None)


def on_backbone(head: DenseModel, backbone: nn.Module, device: torch.device) -> DenseModel:
    """``head`` (:func:`task_head`) running on ``backbone``, its pyramid and head moved to ``device``."""
    head.backbone = backbone
    if next(head.head.parameters()).device != device:
        head.pyramid.to(device)
        head.head.to(device)
    return head


def task_loss(model: DenseModel, data: Any):
    """``(forward(backbone, x), loss_fn(output, index))`` for ``model``'s task: the loss per image
    (B,), the images named by their index in ``data`` (a :class:`~vitrim.data.coco.DenseSet`)."""
    head = task_head(model)

    def forward(backbone, x: torch.Tensor) -> torch.Tensor:
        maps = backbone.forward_intermediates(x, [head.dense.index])[0]
        return on_backbone(head, backbone, x.device).predict(maps, x.shape[-2:])

    if model.dense.task == "segment":
        def loss_fn(output: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            classes = data.batch_targets(index, "segment").to(output.device)
            return F.cross_entropy(output, classes, reduction="none").mean(dim=(1, 2))  # (B,)
    else:
        def loss_fn(output: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            return torch.stack([detection_loss(output[i:i + 1], [data.targets[int(j)]], model.stride)
                                for i, j in enumerate(index)])  # (B,)
    return forward, loss_fn


def batch_task_loss(model: DenseModel, data: Any, loss: Callable[[DenseModel, tuple], torch.Tensor]):
    """``loss(dense model, (images, targets)) -> scalar`` as a loss of the backbone being pruned on
    batches of ``(images, index)``: the dense model it receives is ``model``'s pyramid and head (a
    copy) on that backbone, the targets ``data.batch_targets(index, task)``."""
    head = task_head(model)

    def backbone_loss(backbone, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, index = batch
        targets = target_to(data.batch_targets(index, model.dense.task), x.device)
        return loss(on_backbone(head, backbone, x.device), (x, targets))

    return backbone_loss


def prune_dense(model: DenseModel, target: str = "flops=0.5", data: Any = None, *,
                loss: Callable[[DenseModel, tuple], torch.Tensor] | None = None,
                **options: Any) -> tuple[DenseModel, Any]:
    """``model`` with its backbone pruned to ``target`` (of the backbone's cost) by the task loss on
    ``data`` (a ``DenseSet``); returns the new dense model and the backbone's
    :class:`~vitrim.prune.api.PruneResult`. ``options`` are :class:`~vitrim.prune.PruneConfig` fields.

    ``loss(dense_model, (images, targets))``, the batch's mean loss, replaces the task's own (which
    is exact per image): ``targets`` are :meth:`DenseSet.batch_targets` — box dicts for a detector,
    class maps (B, S, S) for a segmenter."""
    from vitrim.data.coco import DenseSet
    from vitrim.dense.train import check_classes
    from vitrim.prune import prune

    if not isinstance(model, DenseModel):
        raise ConfigError(f"prune_dense prunes a vitrim DenseModel, got {type(model).__name__}")
    if not isinstance(data, DenseSet) or len(data) == 0:
        raise ConfigError(f"pruning a dense model needs its task's data (a DenseSet from vitrim.data.coco.load_coco), "
                          f"got {type(data).__name__ if data is not None else 'none'}")
    check_classes(model, data)
    if loss is not None and options.get("saliency") == "magnitude":
        raise ConfigError("the magnitude saliency reads no loss; drop loss=, or use saliency='fisher'")
    for name in CLASSIFICATION_KD_OPTIONS:
        if options.pop(name, None) is not None:
            raise ConfigError(f"{name} (--{name.replace('_', '-')}) applies to a classifier's distillation; a dense "
                              f"model distils its feature map and head outputs, without labels or augmentation "
                              f"(kd_epochs, kd_images, kd_lr, kd_batch_size set it)")
    recover = options.pop("recover", "reconstruct")
    kd = {key: options.pop(key) for key in KD_OPTIONS if key in options}
    options.setdefault("structures", BACKBONE_STRUCTURES)
    if "embed" in options["structures"]:
        raise ConfigError("the feature pyramid reads the backbone's embedding width: leave 'embed' out of structures")
    objective = dict(zip(("forward", "loss_fn"), task_loss(model, data))) if loss is None \
        else {"loss": batch_task_loss(model, data, loss)}
    calib = indexed(data)  # the loss looks each image's targets up by its index
    options.setdefault("calib_images", len(data))
    layerwise = {"reconstruct+kd": "reconstruct", "kd": "none"}.get(recover, recover)
    result = prune(model.backbone, target, data=calib, objective="labels", recover=layerwise, **objective, **options)
    pruned = copy.deepcopy(model)
    pruned.backbone = result.model
    pruned.use_reduced(None)
    if layerwise != recover:
        with tempfile.TemporaryDirectory() as tmp:
            distill_dense(pruned, model, data, tmp, seed=options.get("seed", 0), progress=options.get("progress", True),
                          device=options.get("device"), **kd)
        result.config = dataclasses.replace(result.config, recover=recover, **{**KD_DEFAULTS, **kd})
    return pruned, result


def prune_dense_model(model: DenseModel, target: str = "flops=0.5", data: Any = None, *,
                      loss: Callable[[DenseModel, tuple], torch.Tensor] | None = None, **options: Any) -> Any:
    """:func:`vitrim.prune` on a dense model: :func:`prune_dense`, the
    :class:`~vitrim.prune.api.PruneResult`'s ``model`` the whole pruned dense model."""
    for name in ("loss_fn", "forward"):
        if options.pop(name, None) is not None:
            raise ConfigError(f"a dense model's loss is loss=fn(model, batch) -> scalar (or its own task loss); "
                              f"{name} applies to backbones")
    for name in ("config", "cost", "train_data"):
        if options.pop(name, None) is not None:
            raise ConfigError(f"{name}= is not taken for a dense model: pass PruneConfig fields as keywords, the "
                              f"task's training split as data=")
    pruned, result = prune_dense(model, target, data, loss=loss, **options)
    result.model = pruned
    return result


KD_DEFAULTS = {"kd_epochs": 1, "kd_images": None, "kd_lr": 2e-4, "kd_batch_size": 32}  # distill_dense's
KD_OPTIONS = tuple(KD_DEFAULTS)
CLASSIFICATION_KD_OPTIONS = ("kd_alpha", "kd_augment")  # PruneConfig fields with no meaning here


def distill_dense(student: DenseModel, teacher: DenseModel, data: Any, out_dir: str | Path, *,
                  kd_epochs: int = KD_DEFAULTS["kd_epochs"], kd_images: int | None = KD_DEFAULTS["kd_images"],
                  kd_lr: float = KD_DEFAULTS["kd_lr"], kd_batch_size: int = KD_DEFAULTS["kd_batch_size"], seed: int = 0,
                  progress: bool = True, device: Any = None) -> DenseModel:
    """Train ``student`` in place to match ``teacher``'s feature map and head outputs on ``data``'s
    images (a ``DenseSet``; no labels used) for ``kd_epochs`` or ``kd_images``: the sum of both
    mean squared errors, each relative to the teacher's variance."""
    from vitrim.train import fit

    teacher = copy.deepcopy(teacher).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def outputs(model: DenseModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = model.feature_map(x)  # (B, C, G, G)
        return features, model.predict(features, x.shape[-2:])

    def loss(model: Any, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            targets = outputs(teacher.to(x.device), x)
        return sum(F.mse_loss(s.float(), t.float()) / t.float().var().clamp_min(1e-8)
                   for s, t in zip(outputs(model, x), targets))

    cfg = dense_train_config(epochs=kd_epochs, lr=kd_lr, min_lr=kd_lr * 0.01, warmup_epochs=0.05, weight_decay=0.01,
                             batch_size=min(kd_batch_size, len(data), kd_images or len(data)), seed=seed,
                             limit_train=kd_images)
    fit(student, indexed(data), cfg, out_dir, progress=progress, loss_fn=loss, device=device)
    return student.eval()
