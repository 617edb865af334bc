"""int8 / 4-bit quantization through ONNX Runtime: sizes, ops, calibrators, metadata, errors."""

import pytest
import torch

import onnxruntime  # noqa: F401  (the vitrim[onnx] extra, installed by make test)

import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from tests.conftest import uneven_config  # noqa: E402
from vitrim.data import ImageSet  # noqa: E402
from vitrim.models import VisionTransformer, uniform_config  # noqa: E402
from vitrim.quant import (CalibrationError, OnnxModel, QuantConfigError, export, quantize)  # noqa: E402

CFG = uniform_config(2, 128, 2, 4.0, image_size=16, patch_size=4, in_chans=1, num_classes=10,
                     mean=(0.5,), std=(0.5,))


def calib_images(n=24, seed=1):
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    """A 2-block, 128-wide model (weights dominate the file, as in real models), exported once."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = VisionTransformer(CFG).eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("fp32") / "model.onnx"
    export(model, path, threads=1)
    return model, path


@pytest.fixture(scope="module")
def quantized(fp32, tmp_path_factory):
    _, path = fp32
    root = tmp_path_factory.mktemp("quant")
    return {scheme: quantize(path, root / scheme, scheme, calib=calib_images(), threads=1)
            for scheme in ("w8-dynamic", "w8a8", "w4")}


# file size on disk against the fp32 file: int8 weights ~4x, 4-bit blocks of 32 ~6x
@pytest.mark.parametrize("scheme,min_ratio", [("w8-dynamic", 3.5), ("w8a8", 3.3), ("w4", 5.3)])
def test_quantized_file_is_smaller_by_the_expected_factor(fp32, quantized, scheme, min_ratio):
    _, path = fp32
    result = quantized[scheme]
    assert result.path.name == "model.onnx" and result.path.stat().st_size == result.size_bytes
    assert result.fp32_size_bytes == path.stat().st_size
    assert path.stat().st_size / result.path.stat().st_size >= min_ratio
    assert result.compression < 8.5


@pytest.mark.parametrize("scheme,ops", [("w8-dynamic", {"DynamicQuantizeLinear", "MatMulInteger"}),
                                        ("w8a8", {"QuantizeLinear", "DequantizeLinear"}),
                                        ("w4", {"MatMulNBits"})])
def test_scheme_uses_onnx_runtime_quantized_ops(quantized, scheme, ops):
    proto = onnx.load(str(quantized[scheme].path))
    present = {n.op_type for n in proto.graph.node}
    assert ops <= present
    assert quantized[scheme].quantized_nodes > 0 and quantized[scheme].preprocessed


def test_w4_is_blockwise_4bit(quantized):
    proto = onnx.load(str(quantized["w4"].path))
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 2 * 6  # q, k, v (split from qkv), proj, fc1, fc2 per block
    attrs = {a.name: a.i for a in nodes[0].attribute}
    assert attrs["bits"] == 4 and attrs["block_size"] == 32


def test_w8a8_weights_are_per_channel(quantized):
    proto = onnx.load(str(quantized["w8a8"].path))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    scales = [inits[n.input[1]] for n in proto.graph.node
              if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
              and inits[n.input[0]].ndim == 2]
    assert scales and all(s.ndim == 1 and s.size > 1 for s in scales)  # one scale per output channel


@pytest.mark.parametrize("scheme,max_diff", [("w8-dynamic", 0.1), ("w8a8", 1.0), ("w4", 0.5)])
def test_quantized_model_stays_close_to_fp32(fp32, quantized, scheme, max_diff):
    model, _ = fp32
    x = calib_images(16, seed=7)
    with torch.no_grad():
        ref = model(x)
    got = OnnxModel(quantized[scheme].path, threads=1)(x)
    err = (got - ref).abs().max().item()
    assert 0 < err < max_diff * ref.abs().max().item()
    report = quantized[scheme].check
    assert report.reference == "ONNX Runtime fp32" and report.images == 24 and report.max_abs_diff > 0


def test_metadata_survives_quantization(fp32, quantized):
    for scheme, result in quantized.items():
        runner = OnnxModel(result.path, threads=1)
        assert runner.config == CFG
        info = runner.quantization
        assert info["scheme"] == scheme
        assert info["calibrator"] == ("minmax" if scheme == "w8a8" else None)
        assert info["calib_images"] == (24 if scheme == "w8a8" else 0)
    assert quantized["w8a8"].calibrator == "minmax" and quantized["w8a8"].calib_images == 24


def _activation_scales(path):
    proto = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    return {n.input[1]: float(inits[n.input[1]]) for n in proto.graph.node
            if n.op_type == "QuantizeLinear" and n.input[1] in inits and inits[n.input[1]].size == 1}


@pytest.mark.parametrize("calibrator", ["entropy", "percentile"])
def test_calibrator_changes_activation_ranges(fp32, quantized, tmp_path, calibrator):
    _, path = fp32
    result = quantize(path, tmp_path / "q.onnx", "w8a8", calib=calib_images(), calibrator=calibrator, threads=1)
    assert result.path == tmp_path / "q.onnx" and result.calibrator == calibrator
    minmax, other = _activation_scales(quantized["w8a8"].path), _activation_scales(result.path)
    assert minmax.keys() == other.keys()
    narrower = sum(other[k] < minmax[k] * 0.99 for k in minmax)
    assert narrower >= 2  # clipping calibrators cut tails that min/max keeps
    assert all(other[k] <= minmax[k] * 1.01 for k in minmax)


def test_calibration_from_image_set_uses_first_n(fp32, tmp_path):
    _, path = fp32
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (10, 1, 16, 16), generator=g, dtype=torch.uint8),
                    torch.zeros(10, dtype=torch.long), ["a"], (0.5,), (0.5,))
    result = quantize(path, tmp_path / "out", "w8a8", calib=data, calib_size=6, threads=1)
    assert result.calib_images == 6 and result.check.images == 6


def test_quantize_torch_model_with_uneven_blocks(tmp_path):
    torch.manual_seed(0)
    model = VisionTransformer(uneven_config()).eval()
    result = quantize(model, tmp_path / "w4", "w4", block_size=16, threads=1)
    runner = OnnxModel(result.path, threads=1)
    assert runner.config == model.config and runner.quantization["block_size"] == 16
    x = torch.randn(3, 1, 16, 16)
    assert runner(x).shape == (3, 5)


def test_bad_scheme_and_calibrator_are_rejected_before_work(fp32, tmp_path):
    _, path = fp32
    with pytest.raises(QuantConfigError, match="unknown quantization scheme 'int3'; use one of: w8-dynamic, w8a8, w4"):
        quantize(path, tmp_path / "q", "int3")
    with pytest.raises(QuantConfigError, match="unknown calibrator 'kl'; use one of: minmax, entropy, percentile"):
        quantize(path, tmp_path / "q", "w8a8", calib=calib_images(), calibrator="kl")
    with pytest.raises(QuantConfigError, match="block size must be a power of two >= 16, got 24"):
        quantize(path, tmp_path / "q", "w4", block_size=24)
    assert list(tmp_path.iterdir()) == []


def test_calibration_set_problems(fp32, tmp_path):
    _, path = fp32
    with pytest.raises(CalibrationError, match="asked for 50 calibration images but the set has only 24"):
        quantize(path, tmp_path / "q", "w8a8", calib=calib_images(), calib_size=50)
    with pytest.raises(CalibrationError, match="the calibration set is empty"):
        quantize(path, tmp_path / "q", "w8a8", calib=torch.zeros(0, 1, 16, 16))
    with pytest.raises(CalibrationError, match="the calibration set is empty"):
        quantize(path, tmp_path / "q", "w8a8", calib=[])
    with pytest.raises(CalibrationError, match="needs calibration images"):
        quantize(path, tmp_path / "q", "w8a8")
    with pytest.raises(CalibrationError, match=r"must be \(N, 1, 16, 16\)"):
        quantize(path, tmp_path / "q", "w8a8", calib=torch.randn(4, 1, 28, 28))
    assert list(tmp_path.iterdir()) == []


def test_quantizing_a_quantized_model_is_refused(quantized, tmp_path):
    with pytest.raises(QuantConfigError, match="already quantized"):
        quantize(quantized["w4"].path, tmp_path / "q", "w8-dynamic")


def test_w8a8_quantizes_the_inputs_of_weight_layers_only(quantized):
    proto = onnx.load(str(quantized["w8a8"].path))
    inits = {i.name for i in proto.graph.initializer}
    consumers = {}
    for n in proto.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    weights = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    fed = set()
    for q in (n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits):
        for dq in consumers[q.output[0]]:
            fed |= {(c.op_type, c.input[1] in weights) for c in consumers[dq.output[0]] if c.op_type != "Shape"}
    assert fed == {("Conv", True), ("MatMul", True), ("Gemm", True)}  # not LayerNorm, Softmax, Add, attention
    assert {n.op_type for n in proto.graph.node} >= {"Attention", "LayerNormalization"}  # left in float
