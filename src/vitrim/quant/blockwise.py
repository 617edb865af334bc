"""Blockwise calibration: quantization parameters chosen stage by stage on the stage's output.

Each stage (patch embedding, every block, the head) gets as input the output of the stages before
it *already quantized*, and its quantizers are tuned so that its quantized output matches the
full-precision stage's output on the full-precision input — so errors of earlier stages are
compensated instead of piling up. Per stage: observe every activation range, then a coordinate
search over clipping factors (upper and lower end of each activation range, and the clip of each
weight tensor) scored by the stage-output MSE, then optionally learned weight rounding
(AdaRound-style, no labels), kept only if it beats nearest rounding on the calibration images.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from vitrim.quant.errors import QuantConfigError
from vitrim.quant.fakequant import ActQuant, WeightQuant, set_quant_state
from vitrim.quant.simulate import Stage, stages

ROUNDINGS = ("learned", "nearest")
CHUNK = 64  # images per forward when running a stage over the whole calibration set


@dataclass
class BlockwiseConfig:
    """Knobs of blockwise calibration; the defaults suit 128-512 calibration images."""

    grid: Sequence[float] = (1.0, 0.97, 0.94, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)
    search_images: int = 64
    rounding: str = "learned"
    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-2
    reg: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        self.grid = tuple(float(a) for a in self.grid)
        if not self.grid or any(not 0 < a <= 1 for a in self.grid):
            raise QuantConfigError(f"clipping grid values must be in (0, 1], got {self.grid}")
        if self.rounding not in ROUNDINGS:
            raise QuantConfigError(f"unknown rounding {self.rounding!r}; use one of: {', '.join(ROUNDINGS)}")
        if min(self.search_images, self.batch_size) < 1 or self.steps < 0:
            raise QuantConfigError("search_images and batch_size must be positive, steps >= 0")


@dataclass
class StageReport:
    """Stage-output MSE with min/max ranges, after the clipping search, and final."""

    name: str
    mse_minmax: float
    mse_search: float
    mse_final: float
    rounding: str
    clipped: int  # quantizers whose range the search narrowed


@dataclass
class BlockwiseReport:
    images: int
    seconds: float
    stages: list[StageReport] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "seconds": round(self.seconds, 2),
                "stages": [{k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in asdict(s).items()}
                           for s in self.stages]}


def _run(stage: Stage, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([stage.run(part) for part in x.split(CHUNK)])


def _mse(stage: Stage, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((_run(stage, x) - y).pow(2).mean())


def calibrate_blockwise(sim: nn.Module, images: torch.Tensor, config: BlockwiseConfig | None = None,
                        log: Callable[[str], None] = lambda text: None) -> BlockwiseReport:
    """Calibrate every quantizer of the simulated model ``sim`` in place, stage by stage.

    ``images`` are normalised calibration inputs ``(N, C, S, S)``. Leaves every quantizer on.
    """
    cfg = config or BlockwiseConfig()
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(cfg.seed)
    report = BlockwiseReport(images=int(images.shape[0]), seconds=0.0)
    set_quant_state(sim, enabled=False, observing=False)
    x_fp = x_q = images.float()
    for stage in stages(sim):
        y = _run(stage, x_fp)  # full-precision target
        if stage.layers:
            report.stages.append(_calibrate_stage(stage, x_q, y, cfg, generator))
            s = report.stages[-1]
            log(f"{stage.name}: output MSE {s.mse_minmax:.3g} (min/max) -> {s.mse_final:.3g} ({s.rounding} rounding)")
        x_q, x_fp = _run(stage, x_q), y
    report.seconds = time.perf_counter() - started
    return report


def _quantizers(stage: Stage) -> tuple[list[ActQuant], list[WeightQuant]]:
    acts: list[ActQuant] = []
    for layer in stage.layers:
        if layer.act is not None and layer.act not in acts:
            acts.append(layer.act)
    return acts, [layer.wq for layer in stage.layers]


def _calibrate_stage(stage: Stage, x: torch.Tensor, y: torch.Tensor, cfg: BlockwiseConfig,
                     generator: torch.Generator) -> StageReport:
    acts, weights = _quantizers(stage)
    for a in acts:
        a.reset()
        a.observing = True
    _run(stage, x)
    for a in acts:
        a.observing, a.enabled = False, True
    for w in weights:
        w.alpha, w.enabled = 1.0, True
        w.freeze(keep=False)
    xs, ys = x[: cfg.search_images], y[: cfg.search_images]
    minmax = _mse(stage, xs, ys)
    searched = _search_clipping(stage, acts, weights, xs, ys, cfg.grid, minmax)
    rounding, final = "nearest", searched
    if cfg.rounding == "learned" and cfg.steps > 0:
        nearest = _mse(stage, x, y)
        _learn_rounding(stage, weights, x, y, cfg, generator)
        for w in weights:
            w.freeze(keep=True)
        keep = _mse(stage, x, y) < nearest
        if not keep:
            for w in weights:
                w.freeze(keep=False)
        rounding = "learned" if keep else "nearest"
        final = _mse(stage, xs, ys)
    clipped = sum(a.alpha_lo < 1 or a.alpha_hi < 1 for a in acts) + sum(w.alpha < 1 for w in weights)
    return StageReport(stage.name, minmax, searched, final, rounding, clipped)


def _search_clipping(stage: Stage, acts: list[ActQuant], weights: list[WeightQuant], x: torch.Tensor,
                     y: torch.Tensor, grid: tuple[float, ...], current: float) -> float:
    """One coordinate-descent pass over every clipping knob of the stage; returns the best MSE."""
    knobs: list[tuple[Any, str]] = []
    for a in acts:
        knobs.append((a, "alpha_hi"))
        if a.lo is not None and a.lo < 0:
            knobs.append((a, "alpha_lo"))
    knobs += [(w, "alpha") for w in weights]
    for owner, attr in knobs:
        best_value = getattr(owner, attr)
        for value in grid:
            if value == best_value:
                continue
            setattr(owner, attr, value)
            loss = _mse(stage, x, y)
            if loss < current:
                current, best_value = loss, value
        setattr(owner, attr, best_value)
    return current


def _learn_rounding(stage: Stage, weights: list[WeightQuant], x: torch.Tensor, y: torch.Tensor,
                    cfg: BlockwiseConfig, generator: torch.Generator) -> None:
    """AdaRound on the stage output: learn up/down per weight, annealing the rounding penalty."""
    layers = {layer.wq: layer for layer in stage.layers}
    params = [w.start_learning(layers[w].weight2d()) for w in weights]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    warmup = int(0.2 * cfg.steps)
    with torch.enable_grad():
        for step in range(cfg.steps):
            idx = torch.randint(x.shape[0], (min(cfg.batch_size, x.shape[0]),), generator=generator)
            out = stage.run(x[idx])
            loss = (out - y[idx]).pow(2).flatten(1).sum(1).mean()
            if step >= warmup:
                progress = (step - warmup) / max(1, cfg.steps - warmup)
                beta = 2 + (20 - 2) * (1 - progress)
                loss = loss + cfg.reg * sum(w.rounding_penalty(beta) for w in weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
