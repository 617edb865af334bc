"""Numeric agreement between two models on the same images: the check every transform runs."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

Logits = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Agreement:
    """Max abs logit difference and top-1 agreement of a candidate against a reference (for dense
    outputs (B, K, H, W): the share of positions whose top channel agrees, averaged over images)."""

    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    images: int
    reference: str
    tolerance: float | None = None

    @property
    def passed(self) -> bool:
        return self.tolerance is None or self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def summary(self) -> str:
        tol = f" (tolerance {self.tolerance:g})" if self.tolerance is not None else ""
        return (f"max |logit diff| {self.max_abs_diff:.3g}{tol}, top-1 agreement "
                f"{self.top1_agreement * 100:.1f}% on {self.images} images vs {self.reference}")


@torch.no_grad()
def compare(reference: Logits, candidate: Logits, batches: Iterable[torch.Tensor], *,
            reference_name: str, tolerance: float | None = None, classes: int | None = None) -> Agreement:
    """Run both callables on each batch ``(B, C, H, W)`` and accumulate the differences; the top-1
    agreement is over the first ``classes`` output channels (default: all; a detector's heatmaps
    come before its box channels)."""
    worst, total, agree, count, elements = 0.0, 0.0, 0, 0, 0
    for x in batches:
        ref = reference(x).float()  # (B, classes) or dense (B, K, H, W)
        out = candidate(x).float()
        diff = (ref - out).abs()
        step = diff.max().item()
        worst = max(worst, step if step == step else float("inf"))  # NaN counts as failure
        total += diff.sum().item()
        elements += diff.numel()
        top = slice(0, classes)
        same = (ref[:, top].argmax(1) == out[:, top].argmax(1)).reshape(x.shape[0], -1).float()  # (B, positions)
        agree += same.mean(1).sum().item()
        count += x.shape[0]
    if count == 0:
        raise ValueError("compare() needs at least one image")
    return Agreement(worst, total / elements, agree / count, count, reference_name, tolerance)
