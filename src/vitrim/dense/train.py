"""Training a dense model (segmenter or detector) with its task loss, through
:func:`vitrim.train.fit`: AdamW, warm-up + cosine, per-epoch atomic checkpoints, ``resume``.

The trainer batches an :class:`~vitrim.data.ImageSet` whose "labels" are the images' indices in
the :class:`~vitrim.data.coco.DenseSet`; the loss looks their targets up. Images are not
augmented (boxes and masks would have to move with them).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vitrim.data.dataset import ImageSet
from vitrim.dense.detection import detection_loss, evaluate_detection
from vitrim.dense.segmentation import evaluate_segmentation
from vitrim.errors import ConfigError, DataError
from vitrim.models.dense import DenseModel
from vitrim.train import TrainConfig, TrainResult, fit

# `vitrim train --task`: the recipe where it differs from classification's TrainConfig defaults
DENSE_DEFAULTS = {"batch_size": 32, "lr": 5e-4, "label_smoothing": 0.0, "augment": "none"}


def dense_train_config(**settings: Any) -> TrainConfig:
    """A :class:`TrainConfig` for dense training: :data:`DENSE_DEFAULTS` under ``settings``."""
    settings = {**DENSE_DEFAULTS, **settings}
    if settings["augment"] != "none":
        raise ConfigError("dense training does not augment images (boxes and masks would have to move with "
                          "them); drop --augment")
    return TrainConfig(**settings)


def indexed(data: Any) -> ImageSet:
    """``data``'s images labelled by their own index (the trainer's batches name the targets)."""
    return ImageSet(data.images, torch.arange(len(data)), [str(i) for i in range(len(data))], data.mean,
                    data.std, name=data.name)


def dense_loss(data: Any, task: str) -> Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(model, images (B, C, S, S), index (B,)) -> loss``: per-pixel cross-entropy or CenterNet's loss."""
    def segment(model: Any, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        classes = data.batch_targets(index, "segment").to(x.device)  # (B, S, S)
        return F.cross_entropy(model(x).float(), classes)

    def detect(model: Any, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return detection_loss(model(x).float(), data.batch_targets(index, "detect"), model.stride)

    return segment if task == "segment" else detect


class _OnDevice(torch.nn.Module):
    """``model`` run on ``device``, fed and returning CPU tensors (the metrics are computed there)."""

    def __init__(self, model: DenseModel, device: torch.device) -> None:
        super().__init__()
        self.model, self.device, self.stride = model, device, model.stride
        self.train(model.training)  # the evaluation restores this mode afterwards

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.to(self.device)).float().cpu()


def evaluate_dense(model: DenseModel, data: Any, batch_size: int = 32,
                   device: str | torch.device | None = None) -> dict[str, float]:
    """``map``, ``ap50``, ``ap75``, ``ap_small/medium/large`` (detect) or ``miou``, ``pixel_accuracy``
    (segment) of ``model`` on the ``DenseSet`` ``data``; ``device``: where the model runs (default:
    where it is)."""
    from vitrim.device import module_device, resolve_device

    was = module_device(model)
    where = was if device is None else resolve_device(device)
    try:
        return score_dense(_OnDevice(model.to(where), where), model.dense.task, data, batch_size)
    finally:
        model.to(was)


def score_dense(runner: Any, task: str, data: Any, batch_size: int = 32) -> dict[str, float]:
    """:func:`evaluate_dense`'s metrics of any runner of a dense model (normalised images ->
    the head's maps on the CPU; with ``stride``, ``training`` and ``eval``/``train``, as an ONNX
    Runtime twin has them) for ``task`` (``detect`` or ``segment``)."""
    if task == "detect":
        return evaluate_detection(runner, data, batch_size)
    score = evaluate_segmentation(runner, data, batch_size)
    return {"miou": score.miou, "pixel_accuracy": score.pixel_accuracy}


def check_classes(model: DenseModel, data: Any) -> None:
    """A :class:`DataError` unless ``model``'s head predicts ``data``'s categories."""
    expected = len(data.class_names) + (1 if model.dense.task == "segment" else 0)
    if model.dense.num_classes != expected:
        what = "background + " if model.dense.task == "segment" else ""
        raise DataError(f"the model predicts {model.dense.num_classes} classes but {data.name} has {expected} "
                        f"({what}{len(data.class_names)} categories); use data with the categories it was "
                        f"trained on")


def fit_dense(model: DenseModel, train: Any, cfg: TrainConfig, out_dir: str | Path, *, val: Any = None,
              resume: bool = False, progress: bool = True, locked: bool = False,
              device: str | torch.device | None = None) -> TrainResult:
    """Train ``model`` in place on the ``DenseSet`` ``train`` by its task loss; after each epoch
    its ``val`` metrics (:func:`evaluate_dense`, prefixed ``val_``) join the history."""
    if cfg.augmentations:
        raise ConfigError("dense training does not augment images; use augment='none'")
    if not isinstance(model, DenseModel):
        raise ConfigError(f"fit_dense trains a vitrim DenseModel, got {type(model).__name__}")
    for split in (train, val):
        if split is not None:
            check_classes(model, split)

    def on_epoch_end(trained: Any, record: dict[str, Any]) -> None:
        if val is None:
            return
        metrics = evaluate_dense(trained, val, cfg.batch_size)
        record.update({f"val_{k}": v for k, v in metrics.items()})
        if progress:
            print(", ".join(f"val {k} {v:.4f}" for k, v in metrics.items()), flush=True)

    return fit(model, indexed(train), cfg, out_dir, resume=resume, progress=progress, locked=locked,
               loss_fn=dense_loss(train, model.dense.task), on_epoch_end=on_epoch_end, device=device)
