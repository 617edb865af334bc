"""Top-1 accuracy and mean loss of a model on a labelled image set."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitrim.data.dataset import ImageSet
from vitrim.errors import DataError
from vitrim.progress import progress_bar


def declared_outputs(model: Any) -> int | None:
    """How many logits ``model`` returns, when known without running it (else ``None``).

    An ONNX model's declared output width, or the class count of a vitrim / Hugging Face / timm
    classifier; ``None`` for a backbone or a model that does not say.
    """
    width = getattr(model, "num_outputs", None)
    if isinstance(width, int):
        return width
    inner = getattr(model, "model", None)
    if getattr(model, "family", "vitrim") != "vitrim" and inner is not None:
        from vitrim.adapters import head_kind

        if head_kind(inner) != "classifier":
            return None
    config = getattr(model, "config", None)
    count = getattr(config, "num_classes", None) if hasattr(config, "blocks") else None
    return count if isinstance(count, int) else None


def check_fits(model: Any, data: ImageSet, name: str = "the model") -> None:
    """A :class:`DataError` when ``data``'s labels or class count do not fit ``model``'s outputs.

    Uses :func:`declared_outputs`; a model that does not declare its width is checked by
    :func:`evaluate` on its first batch instead.
    """
    width = declared_outputs(model)
    if width is not None:
        data.check_classes(width, name)


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSet, batch_size: int = 256, image_size: int | None = None,
             progress: bool = False, desc: str = "eval", device: str | torch.device | None = None) -> dict[str, float]:
    """``{"accuracy", "loss", "count", "data_images_per_s", "model_images_per_s"}`` with accuracy
    in [0, 1]; the two rates are this process's images per second spent waiting for batches (decoding
    an image folder, resizing) and in the model, to show which one limits.

    ``device``: where a torch model and its batches run (``None``: where the model already is;
    a spec as :func:`vitrim.device.resolve_device` takes; ONNX Runtime models ignore it). Under
    ``torchrun`` every rank evaluates its exact shard (:func:`vitrim.distributed.shard`) and the
    sums are all-reduced, so every rank returns the single-process figures.

    Raises :class:`DataError` before counting anything when the model's outputs do not match the
    data: a label at or beyond the model's output count, or a class count other than its width.
    """
    from vitrim import distributed
    from vitrim.device import module_device, resolve_device, to_device

    if len(data) == 0:
        raise DataError(f"{data.name} holds no images; evaluate on a data set with at least one")
    check_fits(model, data, _model_name(model))
    target = module_device(model) if device is None else resolve_device(device)
    if not isinstance(model, nn.Module):  # ONNX Runtime sessions take CPU tensors
        target = torch.device("cpu")
    to_device(model, target)
    was_training = model.training
    model.eval()
    mine = distributed.shard(torch.arange(len(data)))
    sums = torch.zeros(3, dtype=torch.float64)  # correct, loss sum, count
    seconds = {"data": 0.0, "model": 0.0}  # this rank's wait for batches, and its model's time
    total = -(-len(mine) // batch_size)
    try:
        if len(mine):
            batches = data.take(mine).batches(batch_size, image_size=image_size, device=target)
            bar = iter(progress_bar(batches, total=total, desc=desc, enabled=progress and distributed.is_main()))
            while True:
                started = time.perf_counter()
                batch = next(bar, None)
                seconds["data"] += time.perf_counter() - started
                if batch is None:
                    break
                x, y = batch
                started = time.perf_counter()
                logits = model(x).float()
                if sums[2] == 0:
                    _check_logits(logits, data, x.shape[0], _model_name(model))
                sums[1] += F.cross_entropy(logits, y, reduction="sum").item()  # .item(): the device has finished
                sums[0] += (logits.argmax(-1) == y).sum().item()
                sums[2] += y.numel()
                seconds["model"] += time.perf_counter() - started
    finally:
        model.train(was_training)
    mine_count = float(sums[2])
    correct, loss_sum, count = distributed.all_reduce_sum(sums).tolist()
    rates = {f"{part}_images_per_s": mine_count / max(s, 1e-9) for part, s in seconds.items()}
    return {"accuracy": int(correct) / int(count), "loss": loss_sum / count, "count": int(count), **rates}


def limiting_part(metrics: dict[str, Any]) -> str:
    """One line: images/s of the data and of the model in :func:`evaluate`, and which one limits."""
    data, model = metrics["data_images_per_s"], metrics["model_images_per_s"]
    slower = "data loading" if data < model else "the model"
    return f"images/s: data {data:,.0f}, model {model:,.0f} ({slower} limits)"


def _check_logits(logits: torch.Tensor, data: ImageSet, batch: int, name: str) -> None:
    """The first batch's output must be ``(batch, classes)`` logits that fit the data's labels."""
    if logits.ndim != 2 or logits.shape[0] != batch:
        raise DataError(f"{name} returns outputs of shape {tuple(logits.shape)} for {batch} images; evaluation "
                        f"needs class logits (batch, classes); use a classifier, not a backbone")
    data.check_classes(logits.shape[1], name)


def _model_name(model: Any) -> str:
    name = getattr(model, "name", None)
    return f"the model {name}" if isinstance(name, str) else f"the model ({type(model).__name__})"
