"""ONNX graph rewrites: attention heads in place and split q/k/v projections, numerically unchanged."""

import numpy as np
import pytest
import torch

import onnxruntime  # noqa: F401  (the vitrim[onnx] extra, installed by make test)

import onnx  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

from vitrim.quant import OnnxModel, export  # noqa: E402
from vitrim.quant.graphfuse import attention_heads_in_place, split_projections  # noqa: E402
from vitrim.quant.onnxfile import serialize  # noqa: E402


def _images(n=4, seed=1):
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def _ops(proto):
    return [n.op_type for n in proto.graph.node]


def test_exported_attention_takes_its_heads_in_place(uneven_model, tmp_path):
    export(uneven_model, tmp_path / "m.onnx", threads=1)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    attention = [n for n in proto.graph.node if n.op_type == "Attention"]
    assert len(attention) == 3  # blocks 0, 1 and 3 (block 2 has none)
    heads = [{a.name: a.i for a in n.attribute if a.name.endswith("num_heads")} for n in attention]
    assert heads == [{"q_num_heads": 3, "kv_num_heads": 3}, {"q_num_heads": 1, "kv_num_heads": 1},
                     {"q_num_heads": 2, "kv_num_heads": 2}]
    assert _ops(proto).count("Transpose") == 1  # only the patch embedding's (B, C, P) -> (B, P, C) is left
    info = [p.value for p in proto.metadata_props if p.key == "vitrim.export"]
    assert '"attention_heads_in_place": 3' in info[0]
    x = _images()
    with torch.no_grad():
        expected = uneven_model(x)
    torch.testing.assert_close(OnnxModel(tmp_path / "m.onnx", threads=1)(x), expected, atol=1e-5, rtol=1e-4)


def test_opset_18_keeps_attention_decomposed_and_agrees(uneven_model, tmp_path):
    r18 = export(uneven_model, tmp_path / "m18.onnx", opset=18, threads=1)
    r23 = export(uneven_model, tmp_path / "m23.onnx", threads=1)
    assert (r18.opset, r23.opset) == (18, 23)
    assert "Attention" not in _ops(onnx.load(str(tmp_path / "m18.onnx")))
    x = _images()
    out18, out23 = OnnxModel(r18.path, threads=1)(x), OnnxModel(r23.path, threads=1)(x)
    torch.testing.assert_close(out18, out23, atol=1e-5, rtol=1e-4)


def test_split_projections_gives_each_part_its_own_matmul_and_the_same_outputs(uneven_model, tmp_path):
    export(uneven_model, tmp_path / "m.onnx", threads=1)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    before = serialize(proto)
    assert split_projections(proto) == 3
    ops = _ops(proto)
    assert "Split" not in ops and ops.count("MatMul") == _ops(onnx.load(str(tmp_path / "m.onnx"))).count("MatMul") + 6
    onnx.checker.check_model(proto)
    names = {i.name for i in proto.graph.initializer}
    assert not any(name.endswith("attn.qkv.bias") for name in names)  # the fused originals are gone
    x = _images()
    torch.testing.assert_close(OnnxModel(serialize(proto), threads=1)(x), OnnxModel(before, threads=1)(x),
                               atol=1e-6, rtol=1e-5)


def _split_graph(extra_consumer: bool):
    """x (1, 4, 6) @ W (6, 9) + b, split 3/3/3 on the last axis, outputs summed."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 9)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(9).astype(np.float32), "b"),
             numpy_helper.from_array(np.array([3, 3, 3], dtype=np.int64), "sizes")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
             helper.make_node("Add", ["mm", "b"], ["y"], name="add"),
             helper.make_node("Split", ["y", "sizes"], ["p0", "p1", "p2"], axis=2, name="split"),
             helper.make_node("Add", ["p0", "p1"], ["s"]), helper.make_node("Add", ["s", "p2"], ["out"])]
    outputs = [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [1, 4, 3])]
    if extra_consumer:
        outputs.append(helper.make_tensor_value_info("mm", onnx.TensorProto.FLOAT, [1, 4, 9]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 6])],
                              outputs, inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def _run(proto, x):
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["out"], {"x": x})[0]


def test_split_projections_on_a_small_graph_and_leaves_a_shared_output_alone():
    x = np.random.default_rng(1).standard_normal((1, 4, 6)).astype(np.float32)
    proto = _split_graph(extra_consumer=False)
    expected = _run(proto, x)
    assert split_projections(proto) == 1
    assert _ops(proto) == ["MatMul", "Add", "MatMul", "Add", "MatMul", "Add", "Add", "Add"]
    np.testing.assert_allclose(_run(proto, x), expected, rtol=1e-6, atol=1e-6)
    shared = _split_graph(extra_consumer=True)  # the fused MatMul's output is also a graph output
    assert split_projections(shared) == 0 and "Split" in _ops(shared)


def _attention_graph(q_heads=2, kv_heads=2, x_shape=None, share_transpose=False):
    """q/k/v of (2, 4, H*3) (or ``x_shape``) head-split by Reshape + Transpose into an opset-23
    Attention, merged back."""
    N, d = 4, 3
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array([-1, N, h, d], dtype=np.int64), f"shape{h}") for h in {q_heads, kv_heads}]
    inits.append(numpy_helper.from_array(np.array([-1, N, q_heads * d], dtype=np.int64), "merged"))
    nodes, inputs, feed = [], [], {}
    for name, heads in (("q", q_heads), ("k", kv_heads), ("v", kv_heads)):
        shape = x_shape or (2, N, heads * d)
        inputs.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(shape)))
        feed[name] = rng.standard_normal(shape).astype(np.float32)
        nodes += [helper.make_node("Reshape", [name, f"shape{heads}"], [f"{name}4"]),
                  helper.make_node("Transpose", [f"{name}4"], [f"{name}h"], perm=[0, 2, 1, 3])]
    outputs = [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)]
    k_in = "qh" if share_transpose else "kh"
    if share_transpose:
        outputs.append(helper.make_tensor_value_info("qh", onnx.TensorProto.FLOAT, None))
    nodes += [helper.make_node("Attention", ["qh", k_in, "vh"], ["att"], scale=0.5),
              helper.make_node("Transpose", ["att"], ["att_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["att_t", "merged"], ["out"])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    return onnx.shape_inference.infer_shapes(proto), feed


def _run_feed(proto, feed, output="out"):
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([output], feed)[0]


def test_attention_in_place_matches_with_grouped_query_heads():
    proto, feed = _attention_graph(q_heads=4, kv_heads=2)
    expected = _run_feed(proto, feed)
    assert attention_heads_in_place(proto) == 1
    assert _ops(proto) == ["Attention"]
    np.testing.assert_allclose(_run_feed(proto, feed), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["shared transpose", "not (B, N, H*D)", "opset 18 export"])
def test_attention_rewrite_leaves_unmatched_graphs_alone(case, uneven_model, tmp_path):
    if case == "opset 18 export":  # attention as MatMul / Softmax: nothing to rewrite
        export(uneven_model, tmp_path / "m.onnx", opset=18, threads=1)
        proto = onnx.load(str(tmp_path / "m.onnx"))
    elif case == "shared transpose":  # the head-split q is also a graph output
        proto, _ = _attention_graph(share_transpose=True)
    else:  # (B, H*D, N) reshaped to heads would need a copy the 3-D form does not make
        proto, _ = _attention_graph(x_shape=(2, 6, 4))
    before = proto.SerializeToString()
    assert attention_heads_in_place(proto) == 0
    assert proto.SerializeToString() == before


def test_split_projections_leaves_a_split_across_tokens_alone():
    proto = _split_graph(extra_consumer=False)
    next(a for a in proto.graph.node[2].attribute if a.name == "axis").i = 1
    proto.graph.initializer[2].CopyFrom(numpy_helper.from_array(np.array([1, 3], dtype=np.int64), "sizes"))
    del proto.graph.node[2].output[2]
    before = proto.SerializeToString()
    assert split_projections(proto) == 0
    assert proto.SerializeToString() == before


def test_split_projections_names_parts_of_a_shared_weight_apart():
    """One weight and bias used by two projections (the same layer applied twice) split into distinct parts."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 4)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
             numpy_helper.from_array(np.array([2, 2], dtype=np.int64), "sizes")]
    nodes = []
    for i in range(2):
        nodes += [helper.make_node("MatMul", [f"x{i}", "W"], [f"mm{i}"]),
                  helper.make_node("Add", [f"mm{i}", "b"], [f"y{i}"]),
                  helper.make_node("Split", [f"y{i}", "sizes"], [f"p{i}", f"q{i}"], axis=-1),
                  helper.make_node("Mul", [f"p{i}", f"q{i}"], [f"o{i}"])]
    nodes.append(helper.make_node("Add", ["o0", "o1"], ["out"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(f"x{i}", onnx.TensorProto.FLOAT, [3, 6])
                                           for i in range(2)],
                              [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [3, 2])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    feed = {f"x{i}": rng.standard_normal((3, 6)).astype(np.float32) for i in range(2)}
    expected = _run_feed(proto, feed)
    assert split_projections(proto) == 2
    names = [i.name for i in proto.graph.initializer]
    assert len(names) == len(set(names)) == 8  # 2 sites x 2 parts x (weight, bias); W, b and sizes gone
    onnx.checker.check_model(proto)
    np.testing.assert_allclose(_run_feed(proto, feed), expected, rtol=1e-6, atol=1e-6)
