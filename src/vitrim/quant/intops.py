"""Integer-only kernels in the manner of I-ViT, simulated exactly on int64 tensors.

Every function here takes and returns integer tensors; real-valued scales appear only when
constants are prepared (dyadic multipliers ``m / 2**k``), never at run time. Matrix products of
8-bit operands run as float32 (or float64) BLAS calls whose every partial sum is an integer
small enough to be exact, so they equal an int32-accumulating kernel bit for bit.
"""

from __future__ import annotations

import math

import torch

MULT_BITS = 31  # dyadic multipliers are int32: m in [2**30, 2**31)
EXP_BITS = 15  # fixed-point fraction bits of the shift-based exponential
LN_BITS = 15  # fraction bits of the normalised value inside integer LayerNorm
LN_PRE_BITS = 8  # extra integer bits for LayerNorm's mean and variance
FLOAT32_EXACT = 2**24


def dyadic(real: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, k)`` int64 with ``m / 2**k`` the closest dyadic number to each positive ``real``."""
    r = torch.as_tensor(real, dtype=torch.float64)
    exponent = torch.floor(torch.log2(r.clamp_min(1e-300)))
    k = (MULT_BITS - 1 - exponent).clamp(1, 62)
    m = torch.round(r * torch.pow(2.0, k)).to(torch.int64)
    return torch.where(r > 0, m, torch.zeros_like(m)), k.to(torch.int64)


def requantize(acc: torch.Tensor, m: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``round(acc * m / 2**k)`` in integers (round half up): rescale between integer domains."""
    one = torch.ones_like(k)
    return torch.bitwise_right_shift(acc * m + torch.bitwise_left_shift(one, k - 1), k)


def saturate(x: torch.Tensor, bits: int, signed: bool = True) -> torch.Tensor:
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return x.clamp(lo, hi)


def int_matmul(a: torch.Tensor, b: torch.Tensor, bound: int) -> torch.Tensor:
    """``a @ b`` of integer tensors, exact; ``bound`` caps ``|a| * |b| * inner`` (picks the float width)."""
    dtype = torch.float32 if bound < FLOAT32_EXACT else torch.float64
    return torch.matmul(a.to(dtype), b.to(dtype)).round().to(torch.int64)


def shift_exp(x: torch.Tensor, unit: int) -> torch.Tensor:
    """``exp`` of ``x <= 0`` given in steps of ``1 / unit``, as ``2**EXP_BITS``-scaled integers.

    ``x * log2(e)`` is ``x + x/2 - x/16`` (shifts); ``2**(-q + r)`` is a right shift by ``q`` of the
    linear ``1 + r/2`` on the remainder ``r`` in ``(-1, 0]``.
    """
    p = x + torch.bitwise_right_shift(x, 1) - torch.bitwise_right_shift(x, 4)  # ~ x * log2(e)
    q = torch.div(-p, unit, rounding_mode="floor")  # integer part of the power of two
    r = p + q * unit  # in (-unit, 0]
    mantissa = torch.bitwise_left_shift(unit + torch.bitwise_right_shift(r, 1), EXP_BITS)
    q = q.clamp(0, 62)
    return torch.div(torch.bitwise_right_shift(mantissa, q), unit, rounding_mode="floor")


def unit_of(scale: float) -> int:
    """Integer steps per 1.0 of a tensor with this scale (at least 1)."""
    return max(1, round(1.0 / scale))


def shiftmax(scores: torch.Tensor, scale: float, out_bits: int = 8) -> torch.Tensor:
    """Softmax over the last axis of integer ``scores`` (step ``scale``): unsigned ``out_bits`` probabilities
    in steps of ``2**-out_bits``."""
    delta = scores - scores.amax(-1, keepdim=True)
    e = shift_exp(delta, unit_of(scale))
    factor = torch.div(torch.full_like(e[..., :1], 2**62), e.sum(-1, keepdim=True), rounding_mode="floor")
    probs = torch.bitwise_right_shift(e * factor, 62 - out_bits)
    return saturate(probs, out_bits, signed=False)


def shift_gelu(x: torch.Tensor, scale: float, out_bits: int = 8) -> torch.Tensor:
    """``x * sigmoid(1.702 x)`` for integer ``x`` (step ``scale``); result in steps of ``scale * 2**-out_bits``."""
    s = x + torch.bitwise_right_shift(x, 1) + torch.bitwise_right_shift(x, 3) + torch.bitwise_right_shift(x, 4)
    top = s.amax(-1, keepdim=True).clamp_min(0)
    unit = unit_of(scale)
    e_x, e_0 = shift_exp(s - top, unit), shift_exp(-top, unit)
    sigmoid = torch.div(torch.bitwise_left_shift(e_x, out_bits), (e_x + e_0).clamp_min(1), rounding_mode="floor")
    return x * sigmoid


ERF_A, ERF_B = -0.2888, -1.769  # erf(u) ~ sgn(u) * (a * (min(|u|, -b) + b)**2 + 1), I-BERT's i-GELU


def poly_gelu_constants(scale: float, in_bits: int) -> tuple[int, int, int, int, float]:
    """``(clip, offset, one, shift, out_step)`` of :func:`poly_gelu` for ``in_bits`` inputs of step ``scale``."""
    su = scale / 2**0.5  # the same integers read as x / sqrt(2)
    s_l = -ERF_A * su * su  # step of the polynomial's integers
    one = round(1.0 / s_l)
    shift = max(0, (2 ** (in_bits - 1) * 2 * one).bit_length() - 32)  # keep the product within int32 range
    return int(-ERF_B // su), round(ERF_B / su), one, shift, scale * s_l / 2 * 2**shift


def poly_gelu(x: torch.Tensor, clip: int, offset: int, one: int, shift: int) -> torch.Tensor:
    """``x * (1 + erf(x / sqrt 2)) / 2`` with erf as a second-order polynomial, integers only.

    Constants from :func:`poly_gelu_constants`; the result is in steps of its ``out_step``.
    """
    t = x.abs().clamp_max(clip) + offset  # (min(|u|, -b) + b) in steps of scale / sqrt(2)
    erf = torch.sign(x) * (one - t * t)
    return torch.bitwise_right_shift(x * (erf + one), shift)


def isqrt(n: torch.Tensor) -> torch.Tensor:
    """Floor square root of non-negative int64 ``n`` by integer Newton steps from a power of two above it."""
    n = n.clamp_min(0)
    bits = torch.where(n > 0, torch.floor(torch.log2(n.double().clamp_min(1))).to(torch.int64) + 1, 0)
    x = torch.bitwise_left_shift(torch.ones_like(n), (bits + 1) // 2)
    for _ in range(math.ceil(math.log2(64)) + 2):
        y = torch.div(x + torch.div(n, x.clamp_min(1), rounding_mode="floor"), 2, rounding_mode="floor")
        x = torch.minimum(x, y)
    return x


def int_layernorm(x: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` over the last axis of integer ``x``, in steps of ``2**-LN_BITS``.

    ``x`` (at most 16-bit) is first widened by ``LN_PRE_BITS`` so the integer mean and square root
    lose nothing visible.
    """
    n = x.shape[-1]
    x = torch.bitwise_left_shift(x, LN_PRE_BITS)
    mean = torch.div(x.sum(-1, keepdim=True) + n // 2, n, rounding_mode="floor")
    d = x - mean
    var = torch.div((d * d).sum(-1, keepdim=True), n, rounding_mode="floor")
    std = isqrt(var).clamp_min(1)
    return torch.div(torch.bitwise_left_shift(d, LN_BITS), std, rounding_mode="floor")
