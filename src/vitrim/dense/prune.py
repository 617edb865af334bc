"""Prune a dense model's backbone by the task's own loss (SiDT's regime): Fisher saliency of the
segmentation or detection loss through the whole model, the global search and the backbone's
layer-wise reconstruction, the feature pyramid and head kept as they are.

The embedding width is kept (the pyramid reads it), so the structures are heads, MLP units and
whole sub-layers unless ``structures`` says otherwise.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from vitrim.data.dataset import ImageSet
from vitrim.dense.detection import detection_loss
from vitrim.errors import ConfigError
from vitrim.models.dense import DenseModel

BACKBONE_STRUCTURES = ("heads", "qk", "v", "mlp", "attn_layer", "mlp_layer")


def task_loss(model: DenseModel, data: Any):
    """``(forward(backbone, x), loss_fn(output, index))`` for ``model``'s task: the loss per image
    (B,), the images named by their index in ``data`` (a :class:`~vitrim.data.coco.DenseSet`)."""
    head = copy.deepcopy(model)  # the pyramid and head; its backbone is replaced by the one being pruned

    def forward(backbone, x: torch.Tensor) -> torch.Tensor:
        maps = backbone.forward_intermediates(x, [head.dense.index])[0]
        return head.head(head.pyramid(maps), x.shape[-2:])

    if model.dense.task == "segment":
        def loss_fn(output: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            classes = data.semantic[index.cpu()].to(output.device)
            return F.cross_entropy(output, classes, reduction="none").mean(dim=(1, 2))  # (B,)
    else:
        def loss_fn(output: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            return torch.stack([detection_loss(output[i:i + 1], [data.targets[int(j)]], model.stride)
                                for i, j in enumerate(index)])  # (B,)
    return forward, loss_fn


def prune_dense(model: DenseModel, target: str = "flops=0.5", data: Any = None, **options: Any) -> tuple[DenseModel, Any]:
    """``model`` with its backbone pruned to ``target`` (of the backbone's cost) by the task loss on
    ``data`` (a ``DenseSet``); returns the new dense model and the backbone's
    :class:`~vitrim.prune.api.PruneResult`. ``options`` are :class:`~vitrim.prune.PruneConfig` fields."""
    from vitrim.prune import prune

    if not isinstance(model, DenseModel):
        raise ConfigError(f"prune_dense prunes a vitrim DenseModel, got {type(model).__name__}")
    if data is None or len(data) == 0:
        raise ConfigError("pruning a dense model needs its task's data (a DenseSet from vitrim.data.coco.load_coco)")
    if "kd" in options.get("recover", "reconstruct"):
        raise ConfigError("distillation recovers class logits; for a dense model use recover='reconstruct' "
                          "(or 'none') and fine-tune the task afterwards")
    options.setdefault("structures", BACKBONE_STRUCTURES)
    if "embed" in options["structures"]:
        raise ConfigError("the feature pyramid reads the backbone's embedding width: leave 'embed' out of structures")
    forward, loss_fn = task_loss(model, data)
    calib = ImageSet(data.images, torch.arange(len(data)), [str(i) for i in range(len(data))], data.mean, data.std,
                     name=data.name)
    options.setdefault("calib_images", len(data))
    result = prune(model.backbone, target, data=calib, loss_fn=loss_fn, forward=forward, objective="labels",
                   **options)
    pruned = copy.deepcopy(model)
    pruned.backbone = result.model
    pruned.use_reduced(None)
    return pruned, result
