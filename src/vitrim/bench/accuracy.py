"""Top-1 accuracy and mean loss of a model on a labelled image set."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitrim.data.dataset import ImageSet
from vitrim.progress import progress_bar


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSet, batch_size: int = 256, image_size: int | None = None,
             progress: bool = False, desc: str = "eval") -> dict[str, float]:
    """``{"accuracy", "loss", "count"}`` with accuracy in [0, 1]."""
    was_training = model.training
    model.eval()
    correct, loss_sum, count = 0, 0.0, 0
    batches = data.batches(batch_size, image_size=image_size)
    total = -(-len(data) // batch_size)
    for x, y in progress_bar(batches, total=total, desc=desc, enabled=progress):
        logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        count += y.numel()
    model.train(was_training)
    return {"accuracy": correct / count, "loss": loss_sum / count, "count": count}
