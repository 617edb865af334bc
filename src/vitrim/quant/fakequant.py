"""Fake quantization on the integer grids ONNX Runtime itself uses, so a simulated model and its
ORT-quantized twin compute the same numbers.

Activations: uint8, asymmetric, one range per tensor (the QDQ quantizer's ``compute_scale_zp``).
Weights: int8 symmetric per output channel or per tensor (``[-127, 127]``, ``[-64, 64]`` with
reduced range), or ORT's 4-bit block grid of ``MatMulNBits`` (per block of ``block_size`` input
weights: ``t = m / -8`` with ``m`` the block's signed largest-magnitude value, codes ``-8..7``).
Every weight grid is written as ``w_hat = t * clamp(k, kmin, kmax)`` with ``k`` an integer, so a
chosen clip (``alpha``) and learned rounding both live in ``k`` and ``t``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ACT_QMIN, ACT_QMAX = 0, 255
WEIGHT_GRIDS = ("int8-channel", "int8-tensor", "int4-block")
ZETA, GAMMA = 1.1, -0.1  # rectified sigmoid stretch of learned rounding


def act_qparams(rmin: float, rmax: float) -> tuple[float, int]:
    """Scale and zero point ORT's QDQ quantizer derives from a uint8 activation range."""
    lo = min(float(np.float32(rmin)), 0.0)
    hi = max(float(np.float32(rmax)), 0.0)
    scale = (hi - lo) / (ACT_QMAX - ACT_QMIN)  # float64, as ORT computes it
    if scale < np.finfo(np.float32).tiny:
        return 1.0, 0
    return float(np.float32(scale)), int(np.round(ACT_QMIN - lo / scale))


def fake_quant_act(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """``x`` through uint8 ``QuantizeLinear`` / ``DequantizeLinear`` (division, ties to even, as ORT).

    The gradient passes straight through inside the range and is zero outside it.
    """
    q = torch.clamp(torch.round(x.detach() / scale) + zero_point, ACT_QMIN, ACT_QMAX)
    out = (q - zero_point) * scale
    if not x.requires_grad:
        return out
    inside = (q > ACT_QMIN) & (q < ACT_QMAX)
    return out + (x - x.detach()) * inside


class ActQuant(nn.Module):
    """One activation tensor: observes its min/max, then fake-quantizes to uint8.

    ``alpha_lo`` / ``alpha_hi`` shrink the observed range (the clipping search's knobs).
    """

    def __init__(self) -> None:
        super().__init__()
        self.lo: float | None = None
        self.hi: float | None = None
        self.alpha_lo = 1.0
        self.alpha_hi = 1.0
        self.observing = False
        self.enabled = False

    def reset(self) -> None:
        self.lo = self.hi = None
        self.alpha_lo = self.alpha_hi = 1.0

    def range(self) -> tuple[float, float]:
        if self.lo is None or self.hi is None:
            raise RuntimeError("activation range not observed yet")
        return self.lo * self.alpha_lo, self.hi * self.alpha_hi

    def qparams(self) -> tuple[float, int]:
        return act_qparams(*self.range())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            lo, hi = float(x.detach().min()), float(x.detach().max())
            self.lo = lo if self.lo is None else min(self.lo, lo)
            self.hi = hi if self.hi is None else max(self.hi, hi)
        if not self.enabled:
            return x
        return fake_quant_act(x, *self.qparams())


@dataclass(frozen=True)
class WeightGrid:
    """How a weight is quantized: ``kind`` in :data:`WEIGHT_GRIDS`, reduced range, 4-bit block size."""

    kind: str = "int8-channel"
    reduce_range: bool = False
    block_size: int = 32

    def __post_init__(self) -> None:
        if self.kind not in WEIGHT_GRIDS:
            raise ValueError(f"unknown weight grid {self.kind!r}; use one of {', '.join(WEIGHT_GRIDS)}")

    @property
    def bounds(self) -> tuple[int, int]:
        if self.kind == "int4-block":
            return -8, 7
        return (-64, 64) if self.reduce_range else (-127, 127)


class WeightQuant(nn.Module):
    """Quantizes a 2-D view ``(out, in)`` of one weight on a :class:`WeightGrid`.

    ``alpha`` scales the clipping range of every channel / block; after :meth:`start_learning`
    the rounding of each weight is learned (AdaRound's rectified sigmoid) until :meth:`freeze`.
    """

    def __init__(self, grid: WeightGrid) -> None:
        super().__init__()
        self.grid = grid
        self.alpha = 1.0
        self.enabled = False
        self.soft: nn.Parameter | None = None  # (out, in) rounding logits while learning
        self.register_buffer("up", None)  # (out, in) bool: learned rounding, frozen

    def step(self, w2d: torch.Tensor) -> torch.Tensor:
        """The grid step ``t``, broadcastable to ``w2d`` (out, in): (out, 1), (1, 1) or (out, in)."""
        w = w2d.detach()
        if self.grid.kind == "int4-block":
            blocks = self._blocks(w)  # (out, nb, bs)
            hi, lo = blocks.amax(-1), blocks.amin(-1)  # (out, nb)
            major = torch.where(hi.abs() > lo.abs(), hi, lo)  # ties pick the negative end, as ORT does
            t = (major * self.alpha).float() / -8.0
            return t.repeat_interleave(self.grid.block_size, dim=1)[:, : w.shape[1]]
        qmax = self.grid.bounds[1]
        absmax = w.abs().amax(dim=1, keepdim=True) if self.grid.kind == "int8-channel" else w.abs().max().view(1, 1)
        scale = (absmax.double() * self.alpha * 2 / (2 * qmax)).float()
        return torch.where(scale > 0, scale, torch.ones_like(scale))

    def _blocks(self, w: torch.Tensor) -> torch.Tensor:
        bs = self.grid.block_size
        pad = (-w.shape[1]) % bs
        return F.pad(w, (0, pad)).view(w.shape[0], -1, bs)

    def integers(self, w2d: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """Integer codes ``k`` (out, in) of the hard-rounded weight; ``w_hat = t * k``."""
        t = self.step(w2d) if t is None else t
        ratio = w2d.detach() / t
        k = ratio.floor() + self.up.float() if self.up is not None else torch.round(ratio)
        kmin, kmax = self.grid.bounds
        return k.clamp(kmin, kmax)

    def forward(self, w2d: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w2d
        t = self.step(w2d)
        if self.soft is None:
            return t * self.integers(w2d, t)
        kmin, kmax = self.grid.bounds
        k = (w2d.detach() / t).floor() + rectified_sigmoid(self.soft)
        return t * k.clamp(kmin, kmax)

    def start_learning(self, w2d: torch.Tensor) -> nn.Parameter:
        """Begin learned rounding from nearest rounding's fractional parts; returns the parameter."""
        t = self.step(w2d)
        frac = (w2d.detach() / t - (w2d.detach() / t).floor()).clamp(0.01, 0.99)
        p = (frac - GAMMA) / (ZETA - GAMMA)
        self.soft = nn.Parameter(torch.log(p / (1 - p)))
        self.up = None
        return self.soft

    def freeze(self, keep: bool = True) -> None:
        """End learning: keep the learned up/down choices, or go back to nearest rounding."""
        if self.soft is not None and keep:
            self.up = (self.soft.detach() >= 0)
        elif not keep:
            self.up = None
        self.soft = None

    def rounding_penalty(self, beta: float) -> torch.Tensor:
        """AdaRound's regulariser: pushes every soft rounding to 0 or 1."""
        h = rectified_sigmoid(self.soft)
        return (1 - (2 * h - 1).abs().pow(beta)).sum()


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


class _QuantLayer(nn.Module):
    """A wrapped layer with an optional uint8 input quantizer and a weight quantizer."""

    def __init__(self, inner: nn.Module, grid: WeightGrid, quantize_input: bool) -> None:
        super().__init__()
        self.inner = inner
        self.act = ActQuant() if quantize_input else None
        self.wq = WeightQuant(grid)

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.inner.bias

    def weight2d(self) -> torch.Tensor:
        return self.inner.weight.flatten(1)  # (out, in [* kh * kw])

    def quantized_weight(self) -> torch.Tensor:
        return self.wq(self.weight2d()).view_as(self.inner.weight)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.act is None else self.act(x)


class QuantLinear(_QuantLayer):
    """``nn.Linear`` with an optional uint8 input quantizer and a weight quantizer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._input(x), self.quantized_weight(), self.inner.bias)


class QuantConv2d(_QuantLayer):
    """The patch embedding's ``nn.Conv2d`` with a uint8 input quantizer and a per-channel weight quantizer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.inner
        return F.conv2d(self._input(x), self.quantized_weight(), c.bias, c.stride, c.padding, c.dilation, c.groups)


QuantModule = QuantLinear | QuantConv2d


def quant_modules(model: nn.Module) -> list[tuple[str, QuantModule]]:
    """The quantized layers of a simulated model, in registration (= forward) order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))]


def set_quant_state(model: nn.Module, *, enabled: bool | None = None, observing: bool | None = None) -> None:
    """Switch every quantizer in ``model`` (activation and weight) on/off, and observation on/off."""
    for m in model.modules():
        if isinstance(m, ActQuant):
            if enabled is not None:
                m.enabled = enabled
            if observing is not None:
                m.observing = observing
        elif isinstance(m, WeightQuant) and enabled is not None:
            m.enabled = enabled


def replace_layers(model: nn.Module, plan: dict[str, tuple[WeightGrid, bool]]) -> None:
    """Swap each named ``nn.Linear`` / ``nn.Conv2d`` for its quantized wrapper, in place.

    ``plan`` maps a module name to ``(weight grid, quantize its input)``.
    """
    for name, (grid, quantize_input) in plan.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        inner = getattr(parent, child)
        if isinstance(inner, nn.Linear):
            setattr(parent, child, QuantLinear(inner, grid, quantize_input))
        elif isinstance(inner, nn.Conv2d):
            setattr(parent, child, QuantConv2d(inner, grid, quantize_input))
        else:
            raise TypeError(f"{name} is a {type(inner).__name__}, not a Linear or Conv2d")
