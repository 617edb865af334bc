"""ONNX graph rewrites that leave ONNX Runtime fewer, larger kernels, with the same numbers.

- :func:`attention_heads_in_place`: an opset-23 ``Attention`` fed by ``Reshape (B, N, H, D) ->
  Transpose (B, H, N, D)`` for each of q, k and v, and followed by the inverse pair, takes and
  returns ``(B, N, H*D)`` directly (its ``q_num_heads`` / ``kv_num_heads`` attributes); the eight
  copies per block go.
- :func:`split_projections`: ``Split`` of a weight ``MatMul`` + bias ``Add`` along the output
  channels becomes one ``MatMul`` + ``Add`` per part, so no copy of the fused q/k/v output is made.

Both work on an ``onnx.ModelProto`` in place and return how many sites they rewrote; a site that
does not match exactly is left as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

HEADS_FIRST = [0, 2, 1, 3]  # (B, N, H, D) <-> (B, H, N, D)


class _Graph:
    """Producers, consumers and constant initializers of one graph, for pattern matching."""

    def __init__(self, proto: Any) -> None:
        from onnx import numpy_helper

        self.graph = proto.graph
        self.initializers = {i.name: i for i in self.graph.initializer}
        self.producer = {out: node for node in self.graph.node for out in node.output}
        self.consumers: dict[str, list[Any]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.graph_outputs = {o.name for o in self.graph.output}
        self.shapes = {v.name: v for v in [*self.graph.value_info, *self.graph.input, *self.graph.output]}
        self.taken = (set(self.initializers) | set(self.producer) | set(self.consumers) | set(self.shapes)
                      | {n.name for n in self.graph.node})
        self._to_array = numpy_helper.to_array

    def fresh_name(self, stem: str) -> str:
        """``stem``, or ``stem.N``, not yet used by a tensor or node of the graph (and now reserved)."""
        name, n = stem, 1
        while name in self.taken:
            name, n = f"{stem}.{n}", n + 1
        self.taken.add(name)
        return name

    def dims(self, name: str) -> list[int | None] | None:
        """The shape shape inference recorded for ``name`` (``None`` per unknown dim; ``None`` if unrecorded)."""
        info = self.shapes.get(name)
        if info is None or not info.type.tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]

    def constant(self, name: str) -> np.ndarray | None:
        init = self.initializers.get(name)
        return None if init is None else self._to_array(init)

    def only_consumer(self, name: str) -> Any | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.graph_outputs else None

    def produced_by(self, name: str, op_type: str) -> Any | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None

    def drop(self, dead: list[Any]) -> None:
        ids = {id(n) for n in dead}
        kept = [n for n in self.graph.node if id(n) not in ids]
        del self.graph.node[:]
        self.graph.node.extend(kept)
        freed = {name for node in dead for name in node.input}
        used = {name for node in kept for name in node.input} | self.graph_outputs
        for init in [i for i in self.graph.initializer if i.name in freed and i.name not in used]:
            self.graph.initializer.remove(init)
        live = used | {o for node in kept for o in node.output} | {i.name for i in self.graph.initializer}
        for info in [v for v in self.graph.value_info if v.name not in live]:
            self.graph.value_info.remove(info)


def _perm(node: Any) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


def _keeps_batch_and_tokens(shape: np.ndarray, dims: list[int | None]) -> bool:
    """A reshape target whose first two entries keep ``(B, N)`` of a tensor with ``dims``."""
    batch_kept = int(shape[0]) == -1 or (dims[0] is not None and int(shape[0]) == dims[0])
    return batch_kept and dims[1] is not None and int(shape[1]) == dims[1]


def _head_split(g: _Graph, name: str) -> tuple[str, int, int, int, list[Any]] | None:
    """``name`` = Transpose(0,2,1,3)(Reshape(x (B, N, H*D), [B, N, H, D])): ``(x, N, H, D, [the two nodes])``."""
    transpose = g.produced_by(name, "Transpose")
    if transpose is None or _perm(transpose) != HEADS_FIRST or g.only_consumer(name) is None:
        return None
    reshape = g.produced_by(transpose.input[0], "Reshape")
    shape = None if reshape is None else g.constant(reshape.input[1])
    if shape is None or shape.shape != (4,) or min(shape[2:]) <= 0 or g.only_consumer(reshape.output[0]) is None:
        return None
    dims = g.dims(reshape.input[0])
    heads, head_dim = int(shape[2]), int(shape[3])
    if dims is None or len(dims) != 3 or dims[2] != heads * head_dim or not _keeps_batch_and_tokens(shape, dims):
        return None
    return reshape.input[0], dims[1], heads, head_dim, [transpose, reshape]


def _head_merge(g: _Graph, name: str, tokens: int, width: int) -> tuple[str, list[Any]] | None:
    """``name`` -> Transpose(0,2,1,3) -> Reshape([B, N, width]) only: ``(merged output, [the two nodes])``."""
    transpose = g.only_consumer(name)
    if transpose is None or transpose.op_type != "Transpose" or _perm(transpose) != HEADS_FIRST:
        return None
    reshape = g.only_consumer(transpose.output[0])
    shape = None if reshape is None or reshape.op_type != "Reshape" else g.constant(reshape.input[1])
    if shape is None or shape.shape != (3,) or int(shape[2]) != width or int(shape[0]) != -1 or int(shape[1]) != tokens:
        return None
    return reshape.output[0], [transpose, reshape]


def _rewrite_each(proto: Any, op_type: str, rewrite: Callable[[_Graph, Any], list[Any] | None]) -> int:
    """Apply ``rewrite`` to every standard-domain ``op_type`` node; it returns the nodes it made dead
    (``None``: no match, nothing changed). Returns how many sites were rewritten."""
    g = _Graph(proto)
    dead: list[Any] = []
    rewritten = 0
    for node in [n for n in g.graph.node if n.op_type == op_type and n.domain in ("", "ai.onnx")]:
        removed = rewrite(g, node)
        if removed is not None:
            dead += removed
            rewritten += 1
    g.drop(dead)
    return rewritten


def attention_heads_in_place(proto: Any) -> int:
    """Feed opset-23 ``Attention`` nodes ``(B, N, H*D)`` tensors instead of head-split copies."""
    return _rewrite_each(proto, "Attention", _attention_in_place)


def _attention_in_place(g: _Graph, node: Any) -> list[Any] | None:
    from onnx import helper

    if len(node.input) < 3 or len([o for o in node.output if o]) != 1:
        return None
    if any(a.name in ("q_num_heads", "kv_num_heads") for a in node.attribute):
        return None
    splits = [_head_split(g, name) for name in node.input[:3]]
    if any(s is None for s in splits):
        return None
    (q, tokens, heads, _, q_nodes), (k, _, kv_heads, _, k_nodes), (v, _, v_heads, v_dim, v_nodes) = splits
    merge = _head_merge(g, node.output[0], tokens, heads * v_dim) if v_heads == kv_heads else None
    if merge is None:
        return None
    merged, merge_nodes = merge
    node.input[0], node.input[1], node.input[2] = q, k, v
    node.output[0] = merged
    node.attribute.extend([helper.make_attribute("q_num_heads", heads),
                           helper.make_attribute("kv_num_heads", kv_heads)])
    return q_nodes + k_nodes + v_nodes + merge_nodes


def split_projections(proto: Any) -> int:
    """Turn ``Split(Add(MatMul(x, W), b))`` on the last axis into one ``MatMul`` + ``Add`` per part."""
    return _rewrite_each(proto, "Split", _split_one)


def _split_one(g: _Graph, split: Any) -> list[Any] | None:
    from onnx import helper, numpy_helper

    if len(split.input) < 2:
        return None
    add = g.produced_by(split.input[0], "Add")
    matmul = None if add is None else g.produced_by(add.input[0], "MatMul")
    if matmul is None or g.only_consumer(add.output[0]) is None or g.only_consumer(matmul.output[0]) is None:
        return None
    weight, bias, sizes = g.constant(matmul.input[1]), g.constant(add.input[1]), g.constant(split.input[1])
    axis = next((a.i for a in split.attribute if a.name == "axis"), 0)
    if weight is None or bias is None or sizes is None or weight.ndim != 2 or bias.shape != (weight.shape[1],):
        return None
    dims = g.dims(split.input[0])
    if axis != -1 and (axis < 0 or dims is None or axis != len(dims) - 1):
        return None
    if sizes.ndim != 1 or sizes.sum() != weight.shape[1] or len(sizes) != len(split.output):
        return None
    parts, start = [], 0
    for index, (size, out) in enumerate(zip(sizes.tolist(), split.output)):
        w_name, b_name = g.fresh_name(f"{matmul.input[1]}.part{index}"), g.fresh_name(f"{add.input[1]}.part{index}")
        mm_out = g.fresh_name(f"{out}.matmul")
        g.graph.initializer.extend([
            numpy_helper.from_array(np.ascontiguousarray(weight[:, start:start + size]), w_name),
            numpy_helper.from_array(bias[start:start + size].copy(), b_name)])
        parts += [helper.make_node("MatMul", [matmul.input[0], w_name], [mm_out],
                                   name=g.fresh_name(f"{matmul.name or 'MatMul'}.part{index}")),
                  helper.make_node("Add", [mm_out, b_name], [out],
                                   name=g.fresh_name(f"{add.name or 'Add'}.part{index}"))]
        start += size
    at = list(g.graph.node).index(matmul)
    for offset, part in enumerate(parts):
        g.graph.node.insert(at + offset, part)
    return [matmul, add, split]
