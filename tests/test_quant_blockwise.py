"""Blockwise calibration: the simulated twin, its exact hand-over to ONNX Runtime, and its errors."""

from pathlib import Path

import numpy as np
import pytest
import torch

import onnxruntime  # noqa: F401  (the vitrim[onnx] extra, installed by make test)

import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402
from onnxruntime.quantization.quant_utils import compute_scale_zp  # noqa: E402

from tests.conftest import uneven_config  # noqa: E402
from tests.test_quant_quantize import CFG, calib_images, fp32  # noqa: E402,F401  (fp32: the exported model)
from vitrim.compress import CompressConfig, compress  # noqa: E402
from vitrim.data import ImageSet  # noqa: E402
from vitrim.models import VisionTransformer  # noqa: E402
from vitrim.quant import OnnxModel, QuantConfigError, QuantizationError, export, quantize  # noqa: E402
from vitrim.quant.blockwise import BlockwiseConfig  # noqa: E402
from vitrim.quant.fakequant import act_qparams, quant_modules  # noqa: E402
from vitrim.quant.onnxmap import layer_sites  # noqa: E402

QUICK = BlockwiseConfig(grid=(1.0, 0.85, 0.7), search_images=16, steps=30, batch_size=16)


@pytest.fixture(scope="module")
def w8a8(fp32, tmp_path_factory):
    model, path = fp32
    return quantize(path, tmp_path_factory.mktemp("w8a8") / "q.onnx", "w8a8", calib=calib_images(48, 1),
                    calibrator="blockwise", torch_model=model, blockwise=QUICK, threads=1)


@pytest.mark.parametrize("lo,hi", [(-1.3, 2.7), (0.25, 4.0), (-3.0, -0.5), (0.0, 0.0), (-1e-3, 5e-4)])
def test_activation_grid_is_ort_own(lo, hi):
    qmin, qmax = np.array(0, dtype=np.uint8), np.array(255, dtype=np.uint8)
    zp, scale = compute_scale_zp(np.array(lo, dtype=np.float32), np.array(hi, dtype=np.float32), qmin, qmax)
    assert act_qparams(lo, hi) == (float(scale), int(zp))


def test_every_layer_of_an_uneven_model_is_found_in_the_graph(uneven_model, tmp_path):
    export(uneven_model, tmp_path / "m.onnx", threads=1)
    sites = layer_sites(onnx.load(str(tmp_path / "m.onnx")), uneven_model)
    linears = [n for n, m in uneven_model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert sorted(sites) == sorted(linears)
    assert sites["patch_embed.proj"].op_type == "Conv" and sites["head"].op_type == "Gemm"
    assert sites["blocks.0.attn.qkv"].op_type == "MatMul" and sites["blocks.0.attn.qkv"].transposed


def test_w8a8_scales_and_integer_weights_reach_ort_unchanged(fp32, w8a8):
    _, path = fp32
    q = onnx.load(str(w8a8.path))
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    quantize_nodes = {n.input[0]: n for n in q.graph.node if n.op_type == "QuantizeLinear"}
    sites = layer_sites(onnx.load(str(path)), fp32[0])
    layers = quant_modules(w8a8.simulation)
    assert len(layers) == 2 * 4 + 2 and w8a8.calibration["layers"] == "10 of 10"
    for name, layer in layers:
        site = sites[name]
        node = quantize_nodes[site.activation]
        assert (float(inits[node.input[1]]), int(inits[node.input[2]])) == layer.act.qparams()
        codes = _ort_codes(layer, site)
        assert np.array_equal(_integer_weight(inits, site.initializer, codes.shape), codes)


def test_per_tensor_blockwise_keeps_the_fused_projection_on_its_grid(fp32, tmp_path):
    """One weight scale per tensor spans the fused q/k/v weight, so it is not split for ORT."""
    model, path = fp32
    result = quantize(path, tmp_path / "q.onnx", "w8a8", calib=calib_images(32, 1), calibrator="blockwise",
                      per_channel=False, torch_model=model, blockwise=QUICK, threads=1)
    q = onnx.load(str(result.path))
    assert "Split" in {n.op_type for n in q.graph.node}
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    sites = layer_sites(onnx.load(str(path)), model)
    for name, layer in quant_modules(result.simulation):
        codes = _ort_codes(layer, sites[name])
        assert np.array_equal(inits[sites[name].initializer + "_quantized"].reshape(codes.shape), codes)


def _ort_codes(layer, site) -> np.ndarray:
    """The simulated layer's int8 weight codes, laid out as its ONNX initializer."""
    codes = layer.wq.integers(layer.weight2d()).numpy()
    return (codes.T if site.transposed else codes).astype(np.int8)


def _integer_weight(inits: dict, name: str, shape: tuple) -> np.ndarray:
    """A layer's int8 weight; a fused q/k/v weight is quantized as its split parts (columns of ``W.T``)."""
    if name + "_quantized" in inits:
        return inits[name + "_quantized"].reshape(shape)
    parts = [inits[f"{name}.part{i}_quantized"] for i in range(3)]
    return np.concatenate(parts, axis=1).reshape(shape)


def has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def test_simulated_twin_and_ort_model_agree(w8a8):
    x = calib_images(32, 9)
    with torch.no_grad():
        simulated = w8a8.simulation(x)
    ort = OnnxModel(w8a8.path, threads=1)(x)
    spread = simulated.max() - simulated.min()
    # Without VNNI, ONNX Runtime's u8 x s8 kernels sum pairs in saturating int16 (x86 pmaddubsw):
    # measured on an AVX2-only AMD EPYC, a systematic gap of about 1% of the logit range.
    vnni = has_vnni()
    assert (simulated - ort).abs().max() < (0.03 if vnni else 0.06) * spread  # a rare flipped rounding
    assert (simulated - ort).abs().mean() < (0.002 if vnni else 0.015) * spread
    worst = (simulated - ort).abs().max()
    for row in (simulated.argmax(1) != ort.argmax(1)).nonzero().flatten():  # only near-ties may flip
        assert simulated[row].max() - simulated[row, ort[row].argmax()] <= 2 * worst


def test_each_stage_ends_no_worse_than_min_max(w8a8):
    stages = w8a8.calibration["stages"]
    assert [s["name"] for s in stages] == ["embed", "block 0", "block 1", "head"]
    assert all(s["mse_final"] <= s["mse_minmax"] for s in stages)
    assert sum(s["mse_final"] < 0.98 * s["mse_minmax"] for s in stages) >= 2
    assert OnnxModel(w8a8.path, threads=1).quantization["calibrator"] == "blockwise"


def test_w4_blockwise_is_exact_in_ort_and_beats_round_to_nearest(fp32, tmp_path):
    model, path = fp32
    cfg = BlockwiseConfig(grid=(1.0, 0.9, 0.8, 0.7), search_images=32, steps=150, batch_size=16)
    ours = quantize(path, tmp_path / "bw", "w4", calib=calib_images(64, 1), calibrator="blockwise", torch_model=model,
                    blockwise=cfg, block_size=32, threads=1)
    rtn = quantize(path, tmp_path / "rtn", "w4", block_size=32, threads=1)
    x = calib_images(64, 5)  # held-out images
    with torch.no_grad():
        reference, simulated = model(x), ours.simulation(x)
    ours_out, rtn_out = OnnxModel(ours.path, threads=1)(x), OnnxModel(rtn.path, threads=1)(x)
    assert (simulated - ours_out).abs().max() < 1e-4  # 4-bit weights only: the same grid, the same numbers
    assert sum(n.op_type == "MatMulNBits" for n in onnx.load(str(ours.path)).graph.node) == 2 * 6  # q, k, v, proj, fc1, fc2
    assert (ours_out - reference).pow(2).mean() < 0.9 * (rtn_out - reference).pow(2).mean()


def test_blockwise_needs_the_torch_model_and_a_fitting_scheme(fp32, tmp_path):
    model, path = fp32
    with pytest.raises(QuantConfigError, match="needs the vitrim model"):
        quantize(path, tmp_path / "q", "w8a8", calib=calib_images(8, 1), calibrator="blockwise")
    with pytest.raises(QuantConfigError, match="w8-dynamic takes the calibrator"):
        quantize(model, tmp_path / "q", "w8-dynamic", calib=calib_images(8, 1), calibrator="blockwise")
    with pytest.raises(QuantConfigError, match="w4 takes the calibrator\\(s\\) minmax, blockwise, not 'entropy'"):
        quantize(path, tmp_path / "q", "w4", calibrator="entropy")
    with pytest.raises(QuantConfigError, match="unknown rounding 'stochastic'"):
        BlockwiseConfig(rounding="stochastic")
    with pytest.raises(QuantConfigError, match="clipping grid values must be in \\(0, 1\\]"):
        BlockwiseConfig(grid=(1.0, 1.5))
    other = VisionTransformer(CFG).eval()  # same shapes, other weights: not what the file holds
    with pytest.raises(QuantizationError, match="none of the model's layers were found"):
        quantize(path, tmp_path / "q", "w8a8", calib=calib_images(8, 1), calibrator="blockwise", torch_model=other)
    with pytest.raises(QuantConfigError, match="canonical or static token-reduced"):
        quantize(path, tmp_path / "q", "w8a8", calib=calib_images(8, 1), calibrator="blockwise",
                 torch_model=torch.nn.Sequential(model))
    assert list(tmp_path.iterdir()) == []


def test_compress_carries_blockwise_through_a_token_reduced_model(tmp_path):
    torch.manual_seed(0)
    cfg = uneven_config(num_classes=3, blocks=[dict(heads=2, qk_dim=8, v_dim=8, mlp_dim=32)] * 2)
    model = VisionTransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    g = torch.Generator().manual_seed(0)

    def data(n):
        return ImageSet(torch.randint(0, 256, (n, 1, 16, 16), generator=g, dtype=torch.uint8),
                        torch.randint(0, 3, (n,), generator=g), ["a", "b", "c"], (0.5,), (0.25,))

    config = CompressConfig(prune=None, tokens="keep=0.5", token_layers=(0,), quant="w8a8", calib=24,
                            calib_method="blockwise", runs=1, threads=1)
    report = compress(model, data(40), data(16), config, tmp_path, progress=False)
    last = report["stages"][-1]
    assert last["stage"] == "ORT w8a8 (blockwise)" and last["check"]["top1_agreement"] >= 0.9
    info = OnnxModel(tmp_path / "model-w8a8.onnx", threads=1).quantization
    assert info["calibrator"] == "blockwise" and info["blockwise"]["layers"].startswith("10 of")
