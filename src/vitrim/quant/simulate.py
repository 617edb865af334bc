"""A fake-quantized copy of a vitrim model that mirrors what ONNX Runtime quantizes, cut into stages.

Stages are what blockwise calibration walks through in order: the patch embedding, each
transformer block, then the final norm and head. A token-reduced model is calibrated through the
stages of the ViT it wraps and runs with the same quantized layers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from vitrim.models import VisionTransformer
from vitrim.quant.errors import QuantConfigError
from vitrim.quant.fakequant import QuantModule, WeightGrid, quant_modules, replace_layers
from vitrim.quant.onnxmap import LayerSite


@dataclass
class Stage:
    """A piece of the forward pass: ``run`` maps its input to its output; ``layers`` are its quantized layers."""

    name: str
    run: Callable[[torch.Tensor], torch.Tensor]
    layers: list[QuantModule]


def vit_inside(model: nn.Module) -> VisionTransformer:
    """The canonical ViT that ``model`` is or wraps (a static token-reduced model)."""
    if isinstance(model, VisionTransformer):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, VisionTransformer) and getattr(model, "mode", "static") == "static":
        return inner
    raise QuantConfigError(f"blockwise calibration runs on vitrim ViTs (canonical or static token-reduced), "
                           f"got {type(model).__name__}; use --calib-method minmax, entropy or percentile")


def layer_plan(scheme: str, sites: dict[str, LayerSite], *, per_channel: bool = True, reduce_range: bool = False,
               block_size: int = 32) -> dict[str, tuple[WeightGrid, bool]]:
    """Which layers ORT quantizes under ``scheme``, on which weight grid, and whether their input too.

    ``w8a8``: every Conv / Gemm / weight MatMul, int8 weights and uint8 inputs. ``w4``: only the
    MatMul weights (``MatMulNBits``), 4-bit blocks, float inputs.
    """
    if scheme == "w8a8":
        grid = WeightGrid("int8-channel" if per_channel else "int8-tensor", reduce_range)
        return {name: (grid, True) for name in sites}
    if scheme == "w4":
        grid = WeightGrid("int4-block", block_size=block_size)
        return {name: (grid, False) for name, site in sites.items() if site.op_type == "MatMul"}
    raise QuantConfigError(f"scheme {scheme!r} has no simulated twin; blockwise calibration covers w8a8 and w4")


def build_simulation(model: nn.Module, plan: dict[str, tuple[WeightGrid, bool]],
                     sites: dict[str, LayerSite] | None = None) -> nn.Module:
    """A frozen copy of ``model`` whose planned layers are quantized wrappers (all quantizers off).

    Layers that read the same ONNX tensor share one activation quantizer, as they share one
    range in ORT.
    """
    vit_inside(model)
    sim = copy.deepcopy(model).eval()
    for p in sim.parameters():
        p.requires_grad_(False)
    replace_layers(sim, plan)
    if sites:
        shared: dict[str, nn.Module] = {}
        for name, layer in quant_modules(sim):
            if layer.act is None or name not in sites:
                continue
            tensor = sites[name].activation
            if tensor in shared:
                layer.act = shared[tensor]
            else:
                shared[tensor] = layer.act
    return sim


def _layers_in(*modules: nn.Module | None) -> list[QuantModule]:
    seen: list[QuantModule] = []
    for module in modules:
        if module is not None:
            seen += [m for _, m in quant_modules(module) if m not in seen]
    return seen


def stages(sim: nn.Module) -> list[Stage]:
    """Embedding, each block, then final norm, pooling head and head: ``images -> tokens -> ... -> logits``."""
    vit = vit_inside(sim)
    result = [Stage("embed", vit.embed, _layers_in(vit.patch_embed))]
    result += [Stage(f"block {i}", block, _layers_in(block)) for i, block in enumerate(vit.blocks)]
    result.append(Stage("head", lambda tokens: vit.classify(vit.final_norm(tokens)),
                        _layers_in(vit.norm, vit.attn_pool, vit.head, vit.head_dist)))
    return result
