"""The small public API: create, load, save."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from torch import nn

from vitrim.adapters.sources import create, load_model
from vitrim.io import save
from vitrim.prune.api import prune as prune_model


def load(path_or_name: str | Path, pretrained: bool = False) -> nn.Module:
    """Load a model in its own family.

    * a vitrim model directory (``vitrim.save``): a vitrim ViT, or the Hugging Face / timm class
      it was saved from (e.g. a pruned ``ViTForImageClassification``);
    * a Hugging Face ViT/DeiT, DINOv2, CLIP or SigLIP vision directory (``save_pretrained``), or ``"hf:DIR"``;
    * ``"timm:NAME"`` (e.g. ``"timm:deit_small_patch16_224"``): timm's model, random weights unless
      ``pretrained=True`` (which needs the network or timm's local cache);
    * a preset that ships trained weights (e.g. ``"fmnist-vit"``).
    """
    return load_model(path_or_name, pretrained=pretrained).model


@functools.wraps(prune_model, assigned=())  # its signature (inspect follows __wrapped__), this docstring
def prune(model: nn.Module, target: str = "flops=0.5", data: Any = None, **options: Any) -> Any:
    """Prune ``model`` to ``target`` of its cost (e.g. ``"flops=0.5"``) and recover; see
    :func:`vitrim.prune.api.prune` for the options (``recover``, ``loss``, ``structures``, ...).

    A dense model (a detector or segmenter, :class:`~vitrim.models.dense.DenseModel`) has its
    backbone pruned by its task's loss, or by ``loss(model, (images, targets))`` — the batch's mean
    loss, ``model`` the dense model running on the backbone being pruned, ``targets`` the
    :class:`~vitrim.data.coco.DenseSet`'s per-image box dicts (detection) or class maps (B, S, S)
    (segmentation); the pyramid and head are kept and ``result.model`` is the whole dense model
    (:func:`vitrim.dense.prune.prune_dense_model`)."""
    from vitrim.models.dense import DenseModel

    if isinstance(model, DenseModel):
        from vitrim.dense.prune import prune_dense_model

        return prune_dense_model(model, target, data, **options)
    return prune_model(model, target, data, **options)


__all__ = ["create", "load", "prune", "save"]
