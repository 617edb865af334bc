"""Where each PyTorch layer lives in an exported ONNX graph, and writing calibrated weights back.

A layer is found by its weight: the initializer that equals the ``nn.Linear`` weight (``W.T`` for
``MatMul``, ``W`` or ``W.T`` for ``Gemm`` by ``transB``) or the ``nn.Conv2d`` kernel, consumed as
the weight input of a ``MatMul`` / ``Gemm`` / ``Conv`` node. That node's first input is then the
layer's activation, whatever the exporter named it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

WEIGHT_OPS = ("MatMul", "Gemm", "Conv")


@dataclass(frozen=True)
class LayerSite:
    """One torch layer's place in the graph: its node, weight initializer and activation tensor."""

    module: str
    node: str
    op_type: str
    initializer: str
    activation: str
    transposed: bool  # the initializer holds W.T (out/in swapped)


def weight_nodes(proto: Any) -> list[Any]:
    """``Conv`` / ``Gemm`` nodes and the ``MatMul`` nodes whose second input is an initializer."""
    inits = {i.name for i in proto.graph.initializer}
    return [n for n in proto.graph.node
            if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] in inits]


def _gemm_trans_b(node: Any) -> bool:
    return any(a.name == "transB" and a.i == 1 for a in node.attribute)


def layer_sites(proto: Any, model: nn.Module) -> dict[str, LayerSite]:
    """Map every ``nn.Linear`` / ``nn.Conv2d`` of ``model`` (by module name) to its ONNX site.

    Layers whose weight is not found unchanged in a weight input are left out.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    by_shape: dict[tuple[int, ...], list[Any]] = {}
    for node in weight_nodes(proto):
        by_shape.setdefault(tuple(inits[node.input[1]].dims), []).append(node)
    arrays: dict[str, np.ndarray] = {}
    sites: dict[str, LayerSite] = {}
    taken: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        w = module.weight.detach().cpu().numpy()
        options = [(w, False)] if isinstance(module, nn.Conv2d) else [(w.T, True), (w, False)]
        for target, transposed in options:
            found = None
            for node in by_shape.get(tuple(target.shape), []):
                if node.name in taken or (node.op_type == "Conv") != isinstance(module, nn.Conv2d):
                    continue
                if node.op_type == "MatMul" and not transposed:
                    continue
                if node.op_type == "Gemm" and _gemm_trans_b(node) == transposed:
                    continue
                init = node.input[1]
                if init not in arrays:
                    arrays[init] = numpy_helper.to_array(inits[init])
                if np.array_equal(arrays[init], target):
                    found = node
                    break
            if found is not None:
                taken.add(found.name)
                sites[name] = LayerSite(name, found.name, found.op_type, found.input[1], found.input[0], transposed)
                break
    return sites


def write_weights(proto: Any, sites: dict[str, LayerSite], weights: dict[str, torch.Tensor]) -> None:
    """Replace each site's fp32 weight initializer with ``weights[module]`` (torch layout), in place."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    for module, w in weights.items():
        site = sites[module]
        array = w.detach().cpu().float().numpy()
        if site.transposed:
            array = array.T
        old = inits[site.initializer]
        if tuple(old.dims) != array.shape:
            raise ValueError(f"{module}: weight shape {array.shape} does not fit initializer {tuple(old.dims)}")
        old.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), site.initializer))


def carry_calibration(proto: Any, sim: nn.Module, sites: dict[str, LayerSite]) -> dict[str, tuple[float, float]]:
    """Write the simulated model's quantized weights over the fp32 initializers of ``proto``.

    ORT's own min/max weight quantization of a rewritten weight lands on exactly the chosen grid
    (clip and rounding included). Returns each quantized activation tensor's calibrated range.
    """
    from vitrim.quant.fakequant import quant_modules

    weights: dict[str, torch.Tensor] = {}
    ranges: dict[str, tuple[float, float]] = {}
    with torch.no_grad():
        for name, layer in quant_modules(sim):
            weights[name] = layer.quantized_weight()
            if layer.act is not None:
                ranges[sites[name].activation] = layer.act.range()
    write_weights(proto, sites, weights)
    return ranges
