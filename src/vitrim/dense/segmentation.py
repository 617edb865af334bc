"""Semantic segmentation: the per-pixel loss, the confusion matrix, mIoU and pixel accuracy.

Classes are 0 = background and 1..K for the data set's categories (:class:`vitrim.data.coco.DenseSet`
``semantic`` maps); a segmenter predicts K + 1 logits per pixel. mIoU averages the IoU of the
classes that occur in the ground truth or the predictions (the usual convention: a class absent
from both does not count).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitrim.errors import DataError


def segmentation_loss(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel cross-entropy: logits (B, K+1, H, W), classes (B, H, W) long."""
    return F.cross_entropy(logits, classes)


def confusion(predicted: torch.Tensor, classes: torch.Tensor, count: int) -> torch.Tensor:
    """(count, count) matrix: rows the true class, columns the predicted one (both (B, H, W) long)."""
    index = classes.reshape(-1) * count + predicted.reshape(-1)
    return torch.bincount(index, minlength=count * count).reshape(count, count)


@dataclass(frozen=True)
class SegmentationScore:
    """mIoU, pixel accuracy and each class's IoU (None for a class absent from truth and prediction)."""

    miou: float
    pixel_accuracy: float
    per_class_iou: tuple[float | None, ...]
    pixels: int

    @classmethod
    def from_confusion(cls, matrix: torch.Tensor) -> "SegmentationScore":
        matrix = matrix.double()
        hits = matrix.diag()
        union = matrix.sum(0) + matrix.sum(1) - hits
        ious = [float(h / u) if u > 0 else None for h, u in zip(hits, union)]
        present = [v for v in ious if v is not None]
        total = float(matrix.sum())
        return cls(miou=sum(present) / len(present) if present else 0.0,
                   pixel_accuracy=float(hits.sum()) / total if total else 0.0,
                   per_class_iou=tuple(ious), pixels=int(total))


def normalised_batches(data, batch_size: int):
    """``(start, images)`` over a ``DenseSet``: float images (B, C, S, S) normalised by its mean/std."""
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    for start in range(0, len(data), batch_size):
        yield start, (data.images[start:start + batch_size].float() / 255 - mean) / std


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, data, batch_size: int = 32) -> SegmentationScore:
    """Score ``model`` (images -> (B, K+1, H, W) logits) on a :class:`~vitrim.data.coco.DenseSet`;
    under ``torchrun`` each rank scores its shard and the confusion matrices are summed."""
    from vitrim import distributed

    if len(data) == 0:
        raise DataError(f"{data.name} holds no images; evaluate on a set with at least one")
    count = len(data.class_names) + 1
    matrix = torch.zeros(count, count, dtype=torch.long)
    was = model.training
    model.eval()
    mine = data.shard()
    predicted = 0  # classes per pixel the model gave, where it differs from the data's (0: none did)
    try:
        for start, images in normalised_batches(mine, batch_size):
            logits = model(images)
            if logits.shape[1] != count:
                predicted = logits.shape[1]
                break
            matrix += confusion(logits.argmax(1), mine.semantic[start:start + batch_size], count)
    finally:
        model.train(was)
    # one reduction carries the matrix and any rank's mismatch, so every rank raises or none does
    summed = distributed.all_reduce_sum(torch.cat([matrix.flatten(), torch.tensor([predicted])]))
    if summed[-1]:
        raise DataError(f"the model predicts {predicted or 'other numbers of'} classes per pixel but {data.name} has "
                        f"{count} (background + {count - 1}); build the head with num_classes={count}")
    return SegmentationScore.from_confusion(summed[:-1].view(count, count))
