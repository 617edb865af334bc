"""Token reduction on a dense model's backbone, compared across knob values: the task metric
(mIoU or COCO mAP), backbone and whole-model FLOPs kept, and the speed-up of the whole dense
model against itself unreduced, all timed interleaved (what ``vitrim tokens DENSE`` prints).

Merged or dropped tokens are restored to their patches before the pyramid reads the feature map
(merge, then unmerge; see :meth:`vitrim.tokens.model.TokenReducedViT.forward_intermediates`), so
the head is unchanged and needs no training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vitrim.bench.latency import WithSetting, interleaved_latency
from vitrim.dense.cost import dense_cost
from vitrim.dense.train import evaluate_dense
from vitrim.models.dense import DenseModel

DENSE_BATCHES = (1, 8)  # dense models are deployed at small batches


class ReducedDenseRunner(WithSetting):
    """Sets the knob on the token-reduced ``view`` of ``model``'s backbone, then runs ``model``
    through it (a runner for :func:`interleaved_latency`)."""

    def __init__(self, model: DenseModel, view: Any, **settings: Any) -> None:
        super().__init__(view, **settings)
        self.whole = model

    @property
    def config(self) -> Any:
        return self.whole.config

    def __call__(self, x: torch.Tensor) -> Any:
        self.apply()
        return self.whole(x)


def dense_token_sweep(model: DenseModel, view: Any, knob: str, values: Sequence[float], *, val: Any = None,
                      batch_sizes: Sequence[int] = DENSE_BATCHES, threads: int | None = None, runs: int = 30,
                      batch_size: int = 32, device: str | torch.device | None = None
                      ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``(rows, dense)``: per value of ``knob`` (``keep`` or ``tau``) of ``view`` (a
    :func:`vitrim.reduce_tokens` view of ``model.backbone``) its metrics on the ``DenseSet`` ``val``
    (when given), ``backbone_flops_ratio`` and ``flops_ratio`` (whole model) and latency / speed-up
    per batch size; ``dense`` holds the unreduced model's metrics and latency."""
    from vitrim.dense.segmentation import normalised_batches
    from vitrim.device import module_device, resolve_device
    from vitrim.tokens import reduced_flops

    target = module_device(model) if device is None else resolve_device(device)
    model.to(target).eval()
    reduced = model.through(view)
    for value in values:  # validate every knob value before any work
        setattr(view, knob, value)
    cost = dense_cost(model)
    cfg = model.config
    sample = next(normalised_batches(val, batch_size))[1] if val is not None else \
        torch.randn(batch_size, cfg.in_chans, cfg.image_size, cfg.image_size,
                    generator=torch.Generator().manual_seed(0))  # (B, C, S, S)
    dense: dict[str, Any] = {"metrics": evaluate_dense(model, val, batch_size) if val is not None else {}}
    rows: list[dict[str, Any]] = []
    for value in values:
        setattr(view, knob, value)
        row: dict[str, Any] = {knob: value}
        if val is not None:
            row["metrics"] = evaluate_dense(reduced, val, batch_size)
        backbone = reduced_flops(view, sample.to(target))
        row["backbone_flops_ratio"] = backbone / cost["backbone_flops"]
        row["flops_ratio"] = (backbone + cost["head_flops"]) / cost["flops"]
        rows.append(row)
    from vitrim import distributed

    if not distributed.is_main():  # under torchrun the metrics are everyone's; the timing rank 0's alone
        return rows, dense
    runners = {"dense": model, **{f"{knob}={i}": ReducedDenseRunner(reduced, view, **{knob: v})
                                  for i, v in enumerate(values)}}
    timed = interleaved_latency(runners, batch_sizes, threads=threads, runs=runs, device=target)
    for i, row in enumerate(rows):
        stats = timed[f"{knob}={i}"]
        row.update({f"speedup_b{b}": stats[b]["speedup"] for b in batch_sizes})
        row["latency"] = {str(b): stats[b] for b in batch_sizes}
    dense["latency"] = {str(b): timed["dense"][b] for b in batch_sizes}
    return rows, dense

