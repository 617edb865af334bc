"""Integer-only inference of a canonical ViT, simulated in PyTorch (the I-ViT recipe).

Images are quantized once at the input; from there every tensor is an integer: int8 weights
(per output channel) and int8 activations into every matrix product, int32 accumulators,
dyadic requantization (``m / 2**k``) between layers, Shiftmax for softmax, ShiftGELU for GELU,
integer LayerNorm with an integer square root, integer residual adds. Only the logits are turned
back into floats. Scales come from the ranges the float model shows on calibration images.

Widths: matrix-product inputs and the residual stream are ``act_bits`` / ``residual_bits``
(8 and 8 by default, as I-ViT), the GELU input ``gelu_bits`` (16: it comes straight from an
int32 accumulator), softmax probabilities ``softmax_bits`` (8, unsigned). ``gelu="shift"`` is
I-ViT's ShiftGELU (``x * sigmoid(1.702 x)`` from shifts); ``gelu="poly"`` is I-BERT's integer
GELU (erf as a clipped second-order polynomial), closer to the exact GELU without retraining.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitrim.models import VisionTransformer, ViTConfig
from vitrim.quant.errors import QuantConfigError
from vitrim.quant.intops import (
    LN_BITS,
    dyadic,
    int_layernorm,
    int_matmul,
    poly_gelu,
    poly_gelu_constants,
    requantize,
    saturate,
    shift_gelu,
    shiftmax,
    unit_of,
)

GELUS = ("shift", "poly")


@dataclass(frozen=True)
class IntOnlyOptions:
    """Integer widths of the simulated pipeline."""

    act_bits: int = 8
    residual_bits: int = 8
    gelu_bits: int = 16
    softmax_bits: int = 8
    gelu: str = "shift"

    def __post_init__(self) -> None:
        if self.gelu not in GELUS:
            raise QuantConfigError(f"unknown integer GELU {self.gelu!r}; use one of: {', '.join(GELUS)}")
        for name, bits in asdict(self).items():
            if name.endswith("_bits") and not 2 <= bits <= 16:
                raise QuantConfigError(f"{name} must be between 2 and 16, got {bits}")


def observe_absmax(vit: VisionTransformer, images: torch.Tensor) -> dict[str, float]:
    """Largest magnitude of every tensor the integer pipeline quantizes, over ``images`` (float model)."""
    amax: dict[str, float] = {}

    def rec(name: str, t: torch.Tensor) -> None:
        amax[name] = max(amax.get(name, 0.0), float(t.detach().abs().max()))

    def on_out(name: str) -> Callable:
        return lambda module, args, out: rec(name, out)

    def on_qkv(i: int, sizes: list[int]) -> Callable:
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            for n, t in zip("qkv", out.split(sizes, -1)):
                rec(f"{i}.{n}", t)
        return hook

    hooks = []
    for i, b in enumerate(vit.blocks):
        if b.attn is not None:
            hooks.append(b.norm1.register_forward_hook(on_out(f"{i}.ln1")))
            hooks.append(b.attn.qkv.register_forward_hook(on_qkv(i, _qkv_sizes(b.attn))))
            hooks.append(b.attn.proj.register_forward_pre_hook(lambda m, a, i=i: rec(f"{i}.mix", a[0])))
        if b.mlp is not None:
            hooks.append(b.norm2.register_forward_hook(on_out(f"{i}.ln2")))
            hooks.append(b.mlp.fc1.register_forward_hook(on_out(f"{i}.h")))
            hooks.append(b.mlp.act.register_forward_hook(on_out(f"{i}.g")))
    hooks.append(vit.norm.register_forward_hook(on_out("final")))
    try:
        with torch.no_grad():
            for chunk in images.float().split(64):
                rec("in", chunk)
                x = vit.embed(chunk)
                rec("x0", x)
                for i, b in enumerate(vit.blocks):
                    if b.attn is not None:
                        x = x + b.attention_branch(x)
                        rec(f"{i}.x1", x)
                    if b.mlp is not None:
                        x = x + b.mlp_branch(x)
                        rec(f"{i}.x2", x)
                vit.classify(vit.final_norm(x))
    finally:
        for h in hooks:
            h.remove()
    return amax


def _qkv_sizes(attn: nn.Module) -> list[int]:
    return [attn.heads * attn.qk_dim, attn.heads * attn.qk_dim, attn.heads * attn.v_dim]


def _gamma(layer_scale: nn.Module) -> torch.Tensor | None:
    return layer_scale.gamma.detach().double() if hasattr(layer_scale, "gamma") else None


class _Builder:
    """Turns a float ViT and its observed ranges into the integer constants of :class:`IntOnlyViT`."""

    def __init__(self, vit: VisionTransformer, amax: dict[str, float], opts: IntOnlyOptions) -> None:
        self.vit, self.amax, self.opts = vit, amax, opts
        self.c: dict[str, torch.Tensor] = {}

    def scale(self, name: str, bits: int) -> float:
        return max(self.amax[name], 1e-8) / (2 ** (bits - 1) - 1)

    def put(self, key: str, value: Any) -> None:
        self.c[key] = torch.as_tensor(value)

    def linear(self, key: str, weight: torch.Tensor, bias: torch.Tensor | None, s_in: float,
               gamma: torch.Tensor | None = None) -> torch.Tensor:
        """int8 codes, int32 bias; returns the accumulator's per-channel step ``s_in * s_w`` (out,)."""
        w = weight.detach().double().flatten(1)  # (out, in)
        b = bias.detach().double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        if gamma is not None:  # LayerScale folded into the layer
            w, b = w * gamma[:, None], b * gamma
        s_w = (w.abs().amax(1) / 127).clamp_min(1e-12)
        self.put(f"{key}.w", torch.round(w / s_w[:, None]).clamp(-127, 127).to(torch.int8))
        step = s_in * s_w
        self.put(f"{key}.b", torch.round(b / step).to(torch.int64))
        return step

    def rescale(self, key: str, real: torch.Tensor | float) -> None:
        m, k = dyadic(real)
        self.put(f"{key}.m", m)
        self.put(f"{key}.k", k)

    def layernorm(self, key: str, norm: nn.LayerNorm, s_out: float) -> None:
        gamma, beta = norm.weight.detach().double(), norm.bias.detach().double()
        m, k = dyadic(gamma.abs() * 2.0**-LN_BITS / s_out)
        self.put(f"{key}.m", m * torch.sign(gamma).to(torch.int64))
        self.put(f"{key}.k", k)
        self.put(f"{key}.b", torch.round(beta / s_out).to(torch.int64))

    def build(self) -> dict[str, torch.Tensor]:
        vit, o = self.vit, self.opts
        cfg = vit.config
        if cfg.qk_norm:
            raise QuantConfigError("the integer-only simulation does not cover q/k normalisation")
        if cfg.fc_norm and vit.head_dist is not None:
            raise QuantConfigError("the integer-only simulation does not cover a distillation head with fc_norm")
        unsupported = [what for what, present in (
            (f"the {cfg.mlp_act} activation (only GELU)", cfg.mlp_act != "gelu"), ("a gated MLP", cfg.mlp_gated),
            ("a pre-encoder norm", cfg.pre_norm), (f"pool={cfg.pool!r}", cfg.pool in ("map", "cls_mean")),
            ("resized position embeddings", cfg.stored_grid != cfg.grid_size),
            ("a patch embedding or head without bias", not (cfg.patch_bias and cfg.head_bias))) if present]
        if unsupported:
            raise QuantConfigError(f"the integer-only simulation does not cover {', '.join(unsupported)}; use "
                                   f"--scheme w8a8 or w4a8 (ONNX Runtime) for this model")
        s_in = self.scale("in", o.act_bits)
        s_x = self.scale("x0", o.residual_bits)
        self.put("in.scale", torch.tensor(s_in, dtype=torch.float64))
        conv = vit.patch_embed.proj
        step = self.linear("embed", conv.weight, conv.bias, s_in)
        x0 = vit.embed(torch.zeros(1, cfg.in_chans, cfg.image_size, cfg.image_size)).detach().double()
        prefix = vit.num_prefix_tokens
        pos = vit.pos_embed.detach().double()[0]
        pos = pos[prefix:] if cfg.pos_embed_prefix else pos  # (P, C)
        self.put("embed.pos", torch.round(pos / step).to(torch.int64))
        self.rescale("embed.out", step / s_x)
        self.put("embed.prefix", saturate(torch.round(x0[0, :prefix] / s_x), o.residual_bits).to(torch.int64))
        for i, b in enumerate(vit.blocks):
            if b.attn is not None:
                s_x = self._attention(i, b, s_x)
            if b.mlp is not None:
                s_x = self._mlp(i, b, s_x)
        s_f = self.scale("final", o.act_bits)
        self.layernorm("final", vit.norm, s_f)
        for key, head in (("head", vit.head), ("head_dist", vit.head_dist)):
            if head is not None:
                self.put(f"{key}.out", self.linear(key, head.weight, head.bias, s_f))
        return self.c

    def _attention(self, i: int, b: nn.Module, s_x: float) -> float:
        o, attn = self.opts, b.attn
        s_ln = self.scale(f"{i}.ln1", o.act_bits)
        self.layernorm(f"{i}.ln1", b.norm1, s_ln)
        step = self.linear(f"{i}.qkv", attn.qkv.weight, attn.qkv.bias, s_ln)
        s_q, s_k, s_v = (self.scale(f"{i}.{n}", o.act_bits) for n in "qkv")
        sizes = _qkv_sizes(attn)
        out = torch.cat([torch.full((n,), s, dtype=torch.float64) for n, s in zip(sizes, (s_q, s_k, s_v))])
        self.rescale(f"{i}.qkv.out", step / out)
        self.put(f"{i}.score.unit", unit_of(s_q * s_k * attn.scale))
        s_mix = self.scale(f"{i}.mix", o.act_bits)
        self.rescale(f"{i}.mix", 2.0**-o.softmax_bits * s_v / s_mix)
        return self._residual(i, "x1", "proj", attn.proj, s_mix, s_x, _gamma(b.ls1))

    def _mlp(self, i: int, b: nn.Module, s_x: float) -> float:
        o = self.opts
        s_ln = self.scale(f"{i}.ln2", o.act_bits)
        self.layernorm(f"{i}.ln2", b.norm2, s_ln)
        step = self.linear(f"{i}.fc1", b.mlp.fc1.weight, b.mlp.fc1.bias, s_ln)
        s_h = self.scale(f"{i}.h", o.gelu_bits)
        self.rescale(f"{i}.fc1.out", step / s_h)
        s_g = self.scale(f"{i}.g", o.act_bits)
        if o.gelu == "poly":
            *constants, out_step = poly_gelu_constants(s_h, o.gelu_bits)
            self.put(f"{i}.gelu.poly", constants)
        else:
            self.put(f"{i}.gelu.unit", unit_of(s_h))
            out_step = s_h * 2.0**-8
        self.rescale(f"{i}.gelu.out", out_step / s_g)
        return self._residual(i, "x2", "fc2", b.mlp.fc2, s_g, s_x, _gamma(b.ls2))

    def _residual(self, i: int, point: str, key: str, layer: nn.Linear, s_in: float, s_x: float,
                  gamma: torch.Tensor | None) -> float:
        s_new = self.scale(f"{i}.{point}", self.opts.residual_bits)
        step = self.linear(f"{i}.{key}", layer.weight, layer.bias, s_in, gamma)
        self.rescale(f"{i}.{key}.out", step / s_new)
        self.rescale(f"{i}.{point}.skip", torch.tensor(s_x / s_new))
        return s_new


class IntOnlyViT(nn.Module):
    """The integer-only twin of a canonical ViT: ``(B, C, S, S)`` floats in, float logits out.

    Build it with :func:`int_only`; save / load it with :mod:`vitrim.quant.intonly_file`.
    """

    def __init__(self, config: ViTConfig, options: IntOnlyOptions, constants: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.config, self.options = config, options
        self.constants = constants
        # registered so parameter counts see the stored numbers; never trained
        self.stored = nn.ParameterList(nn.Parameter(t, requires_grad=False) for t in constants.values())

    def _get(self, key: str) -> torch.Tensor:
        return self.constants[key]

    def _linear(self, key: str, x: torch.Tensor, in_bits: int) -> torch.Tensor:
        w = self._get(f"{key}.w")  # (out, in) int8
        bound = 2 ** (in_bits - 1) * 128 * w.shape[1]
        return int_matmul(x, w.T, bound) + self._get(f"{key}.b")

    def _requant(self, key: str, acc: torch.Tensor, bits: int) -> torch.Tensor:
        return saturate(requantize(acc, self._get(f"{key}.m"), self._get(f"{key}.k")), bits)

    def _layernorm(self, key: str, x: torch.Tensor) -> torch.Tensor:
        return self._requant(key, int_layernorm(x), 62) + self._get(f"{key}.b")

    def _norm_out(self, key: str, x: torch.Tensor) -> torch.Tensor:
        return saturate(self._layernorm(key, x), self.options.act_bits)

    def embed(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, S, S) -> (B, N, C) residual ints
        cfg, o = self.config, self.options
        x = saturate(torch.round(images.double() / self._get("in.scale")), o.act_bits)
        patches = F.unfold(x, cfg.patch_size, stride=cfg.patch_size).transpose(1, 2)  # (B, P, C*p*p)
        acc = self._linear("embed", patches, o.act_bits) + self._get("embed.pos")
        tokens = self._requant("embed.out", acc, o.residual_bits)
        prefix = self._get("embed.prefix")
        if prefix.shape[0]:
            tokens = torch.cat([prefix.expand(x.shape[0], -1, -1), tokens], dim=1)
        return tokens

    def attention(self, i: int, x: torch.Tensor) -> torch.Tensor:
        o, d = self.options, self.config.blocks[i]
        B, N, _ = x.shape
        h = self._norm_out(f"{i}.ln1", x)
        qkv = self._requant(f"{i}.qkv.out", self._linear(f"{i}.qkv", h, o.act_bits), o.act_bits)
        q, k, v = qkv.split([d.heads * d.qk_dim, d.heads * d.qk_dim, d.heads * d.v_dim], -1)
        q = q.view(B, N, d.heads, d.qk_dim).transpose(1, 2)  # (B, H, N, qk)
        k = k.view(B, N, d.heads, d.qk_dim).transpose(1, 2)  # (B, H, N, qk)
        v = v.view(B, N, d.heads, d.v_dim).transpose(1, 2)  # (B, H, N, v)
        scores = int_matmul(q, k.transpose(-2, -1), 2 ** (2 * o.act_bits - 2) * d.qk_dim)  # (B, H, N, N)
        probs = shiftmax(scores, 1.0 / float(self._get(f"{i}.score.unit")), o.softmax_bits)
        mixed = int_matmul(probs, v, 2**o.softmax_bits * 2 ** (o.act_bits - 1) * N)  # (B, H, N, v)
        mixed = self._requant(f"{i}.mix", mixed.transpose(1, 2).reshape(B, N, -1), o.act_bits)
        return self._residual(i, "x1", "proj", x, self._linear(f"{i}.proj", mixed, o.act_bits))

    def mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        o = self.options
        h = self._norm_out(f"{i}.ln2", x)
        pre = self._requant(f"{i}.fc1.out", self._linear(f"{i}.fc1", h, o.act_bits), o.gelu_bits)
        if o.gelu == "poly":
            gelu = poly_gelu(pre, *(int(v) for v in self._get(f"{i}.gelu.poly")))
        else:
            gelu = shift_gelu(pre, 1.0 / float(self._get(f"{i}.gelu.unit")))
        g = self._requant(f"{i}.gelu.out", gelu, o.act_bits)
        return self._residual(i, "x2", "fc2", x, self._linear(f"{i}.fc2", g, o.act_bits))

    def _residual(self, i: int, point: str, key: str, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        skip = requantize(x, self._get(f"{i}.{point}.skip.m"), self._get(f"{i}.{point}.skip.k"))
        out = requantize(branch, self._get(f"{i}.{key}.out.m"), self._get(f"{i}.{key}.out.k"))
        return saturate(skip + out, self.options.residual_bits)

    def classify(self, x: torch.Tensor) -> torch.Tensor:  # residual ints (B, N, C) -> float logits
        cfg = self.config
        prefix = cfg.num_prefix_tokens
        if cfg.fc_norm:
            patches = x[:, prefix:]
            pooled = torch.div(patches.sum(1) + patches.shape[1] // 2, patches.shape[1], rounding_mode="floor")
            feats = self._norm_out("final", pooled)
            tokens = None
        else:
            tokens = self._norm_out("final", x)
            if cfg.pool == "cls":
                feats = tokens[:, 0]
            else:
                patches = tokens[:, prefix:]
                feats = torch.div(patches.sum(1) + patches.shape[1] // 2, patches.shape[1], rounding_mode="floor")
        bits = self.options.act_bits
        logits = self._linear("head", feats, bits).double() * self._get("head.out")
        if "head_dist.w" in self.constants:
            logits = (logits + self._linear("head_dist", tokens[:, 1], bits).double() * self._get("head_dist.out")) / 2
        return logits.float()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, S, S) -> (B, classes)
        x = self.embed(images)
        for i, dims in enumerate(self.config.blocks):
            if dims.attention:
                x = self.attention(i, x)
            if dims.mlp:
                x = self.mlp(i, x)
        return self.classify(x)

    def size_bytes(self) -> int:
        """Bytes of the integer constants at their integer widths (int8 weights, int32 the rest)."""
        return sum(t.numel() * (1 if t.dtype == torch.int8 else 4) for t in self.constants.values())


def int_only(model: nn.Module, images: torch.Tensor, options: IntOnlyOptions | None = None) -> IntOnlyViT:
    """The integer-only twin of a canonical ViT, its scales set from ``images`` (normalised ``(N, C, S, S)``)."""
    if not isinstance(model, VisionTransformer):
        raise QuantConfigError(f"the integer-only simulation runs canonical vitrim ViTs, got {type(model).__name__}")
    opts = options or IntOnlyOptions()
    model = model.eval()
    with torch.no_grad():
        constants = _Builder(model, observe_absmax(model, images), opts).build()
    return IntOnlyViT(model.config, opts, constants)
