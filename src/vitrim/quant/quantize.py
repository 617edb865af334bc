"""int8 and 4-bit quantization through ONNX Runtime's own quantizers (no hand-written kernels)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitrim.quant import deps
from vitrim.quant.blockwise import BlockwiseConfig, calibrate_blockwise
from vitrim.quant.calib import CalibInput, CalibrationSource, calibration_source, ort_reader
from vitrim.quant.check import Agreement, compare
from vitrim.quant.errors import QuantConfigError, QuantizationError
from vitrim.quant.export import export_proto
from vitrim.quant.graphfuse import split_projections
from vitrim.quant.metadata import Preprocessing, info_props, read_props, write_props
from vitrim.quant.onnxfile import load_proto, parse_proto, serialize, write_bytes
from vitrim.quant.onnxmap import WEIGHT_OPS, carry_calibration, layer_sites, weight_nodes
from vitrim.quant.simulate import build_simulation, layer_plan

SCHEMES = ("w8-dynamic", "w8a8", "w4")
ORT_CALIBRATORS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
CALIBRATORS = (*ORT_CALIBRATORS, "blockwise")
# which calibrators each scheme accepts (w4: ORT's round-to-nearest on min/max blocks, or blockwise)
SCHEME_CALIBRATORS = {"w8-dynamic": ("minmax",), "w8a8": CALIBRATORS, "w4": ("minmax", "blockwise")}
MODEL_FILE = "model.onnx"
CHECK_IMAGES = 16
ENTROPY_BINS = 512  # histogram bins searched for the KL threshold (128 quantized bins); 2048 takes minutes
PERCENTILE_BINS = 2048
# the node each scheme leaves behind; none of them means nothing was quantized
MARKER_OPS = {"w8-dynamic": ("MatMulInteger", "DynamicQuantizeMatMul", "ConvInteger"),
              "w8a8": ("DequantizeLinear",), "w4": ("MatMulNBits",)}


@dataclass
class QuantizeResult:
    """The quantized file, its size against the fp32 model, and its agreement with it."""

    path: Path
    scheme: str
    calibrator: str | None
    calib_images: int
    size_bytes: int
    fp32_size_bytes: int
    quantized_nodes: int
    check: Agreement
    preprocessed: bool
    seconds: float
    calibration: dict[str, Any] | None = None  # the blockwise report
    simulation: nn.Module | None = None  # blockwise: the calibrated fake-quantized PyTorch twin

    @property
    def compression(self) -> float:
        return self.fp32_size_bytes / self.size_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "scheme": self.scheme, "calibrator": self.calibrator,
                "calib_images": self.calib_images, "size_bytes": self.size_bytes,
                "fp32_size_bytes": self.fp32_size_bytes, "compression": round(self.compression, 3),
                "quantized_nodes": self.quantized_nodes, "check": self.check.to_dict(),
                "preprocessed": self.preprocessed, "seconds": round(self.seconds, 3),
                "calibration": self.calibration}


def output_file(out: str | Path) -> Path:
    """``out`` itself when it ends in ``.onnx``, else ``out/model.onnx``."""
    out = Path(out)
    return out if out.suffix == ".onnx" else out / MODEL_FILE


def quantize(onnx_or_model: str | Path | nn.Module | Any, out_path: str | Path, scheme: str = "w8a8", *,
             calib: CalibInput | None = None, calib_size: int | None = None, calibrator: str = "minmax",
             per_channel: bool = True, reduce_range: bool = False, percentile: float = 99.999,
             block_size: int = 32, accuracy_level: int | None = None, threads: int | None = None,
             preprocessing: Preprocessing | None = None, tolerance: float | None = None,
             torch_model: nn.Module | None = None, blockwise: BlockwiseConfig | None = None,
             log: Callable[[str], None] | None = None) -> QuantizeResult:
    """Quantize an ONNX file, ``onnx.ModelProto`` or vitrim model and write the result atomically.

    Schemes: ``w8-dynamic`` (``quantize_dynamic``: int8 weights, activations quantized at run time),
    ``w8a8`` (``quantize_static``, QDQ: per-channel int8 weights and uint8 inputs of every Conv,
    Gemm and weight MatMul, outputs left in float; calibrated on ``calib`` with the ``minmax`` /
    ``entropy`` / ``percentile`` calibrator of ORT or vitrim's ``blockwise`` one), ``w4`` (4-bit
    block-wise weight-only ``MatMulNBits``, ``block_size`` weights per scale; ``blockwise`` learns
    clipping and rounding of the 4-bit weights on ``calib``). A torch model is exported (and
    checked) first. ``blockwise`` simulates the model in PyTorch, so it needs the vitrim model:
    ``onnx_or_model`` itself, or ``torch_model`` beside the ONNX file exported from it;
    ``blockwise`` (a :class:`BlockwiseConfig`) tunes it and ``log`` hears its progress. ``calib_size`` keeps the first N
    calibration images and must not exceed the set. The result is compared with the fp32 model
    in ONNX Runtime on the calibration images (or seeded random ones); ``tolerance`` turns that
    report into a check. ``out_path`` ending in ``.onnx`` is the file, else a directory that
    receives ``model.onnx``. The vitrim metadata is carried into the quantized file. A fused
    q/k/v projection with a bias is split into one weight ``MatMul`` per part before quantizing
    (:func:`~vitrim.quant.graphfuse.split_projections`; not for blockwise w8a8 with one weight
    scale per tensor, whose calibrated grid spans the fused weight).
    """
    started = time.perf_counter()
    _validate(scheme, calibrator, block_size, percentile)
    if isinstance(onnx_or_model, nn.Module):
        torch_model = onnx_or_model
    if calibrator == "blockwise" and torch_model is None:
        raise QuantConfigError("blockwise calibration simulates the model in PyTorch and needs the vitrim model: "
                               "pass the model (CLI: its directory or preset name, not the .onnx file)")
    proto = _fp32_proto(onnx_or_model, threads, preprocessing)
    props = read_props(proto)
    prep = preprocessing or Preprocessing.from_props(props, "the model to quantize")
    calibrated = scheme == "w8a8" or calibrator == "blockwise"
    source = calibration_source(calib, calib_size, prep) if calibrated or calib is not None else None
    fp32 = serialize(proto)
    torch_side = (torch_model, blockwise or BlockwiseConfig(), log) if calibrator == "blockwise" else None
    with tempfile.TemporaryDirectory(prefix="vitrim-quant-") as tmp:
        quantized, preprocessed, report, sim = _run_quantizer(
            fp32, Path(tmp), scheme, source, calibrator, per_channel, reduce_range, percentile, block_size,
            accuracy_level, torch_side)
    marked = sum(n.op_type in MARKER_OPS[scheme] for n in quantized.graph.node)
    if marked == 0:
        raise QuantizationError(f"{scheme}: ONNX Runtime found no weight MatMul/Conv to quantize in this model")
    write_props(quantized, {k: v for k, v in props.items()})
    write_props(quantized, prep.to_props())
    info = {"scheme": scheme, "calibrator": calibrator if calibrated else None,
            "calib_images": source.count if calibrated else 0, "per_channel": per_channel,
            "reduce_range": reduce_range, "block_size": block_size if scheme == "w4" else None,
            "onnxruntime": deps.ort().__version__}
    if report is not None:
        info["blockwise"] = {"layers": report["layers"], "learned_rounding": report["learned_rounding"]}
    write_props(quantized, info_props("quant", info))
    data = serialize(quantized)
    check = _agreement(fp32, data, source, prep, threads, tolerance)
    if not check.passed:
        raise QuantizationError(f"the {scheme} model drifts too far from fp32: {check.summary()}; "
                                f"nothing was written")
    out = write_bytes(data, output_file(out_path))
    return QuantizeResult(out, scheme, info["calibrator"], info["calib_images"], len(data), len(fp32), marked,
                          check, preprocessed, time.perf_counter() - started, report, sim)


def _validate(scheme: str, calibrator: str, block_size: int, percentile: float) -> None:
    if scheme not in SCHEMES:
        raise QuantConfigError(f"unknown quantization scheme {scheme!r}; use one of: {', '.join(SCHEMES)}")
    if calibrator not in CALIBRATORS:
        raise QuantConfigError(f"unknown calibrator {calibrator!r}; use one of: {', '.join(CALIBRATORS)}")
    if calibrator not in SCHEME_CALIBRATORS[scheme]:
        raise QuantConfigError(f"{scheme} takes the calibrator(s) {', '.join(SCHEME_CALIBRATORS[scheme])}, "
                               f"not {calibrator!r}")
    if block_size < 16 or block_size & (block_size - 1):
        raise QuantConfigError(f"block size must be a power of two >= 16, got {block_size}")
    if not 50.0 < percentile <= 100.0:
        raise QuantConfigError(f"percentile must be in (50, 100], got {percentile}")


def _fp32_proto(source: Any, threads: int | None, preprocessing: Preprocessing | None) -> Any:
    if isinstance(source, nn.Module):
        return export_proto(source, threads=threads, preprocessing=preprocessing)[0]
    if isinstance(source, (str, Path)):
        proto = load_proto(source)
    elif hasattr(source, "graph") and hasattr(source, "SerializeToString"):
        proto = parse_proto(source.SerializeToString(), "the given ModelProto")
    else:
        raise QuantConfigError(f"quantize() takes an ONNX path, an onnx.ModelProto or a vitrim model, "
                               f"got {type(source).__name__}")
    info = read_props(proto).get("vitrim.quant")
    if info is not None:
        raise QuantConfigError("this ONNX model is already quantized; quantize the fp32 export instead")
    return proto


def _run_quantizer(fp32: bytes, tmp: Path, scheme: str, source: CalibrationSource | None, calibrator: str,
                   per_channel: bool, reduce_range: bool, percentile: float, block_size: int,
                   accuracy_level: int | None, torch_side: tuple | None) -> tuple[Any, bool, dict | None, Any]:
    deps.onnx()
    deps.ort()
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    raw, pre, out = tmp / "fp32.onnx", tmp / "pre.onnx", tmp / "quantized.onnx"
    raw.write_bytes(fp32)
    report = sim = None
    model_in, preprocessed = raw, False
    # ORT's symbolic shape inference reads an opset-23 Attention as its own contrib op and fails;
    # ONNX's shape inference alone then does. Shape inference is an optimisation: else the raw graph
    for skip_symbolic in (False, True):
        with deps.quiet():
            try:
                quant_pre_process(str(raw), str(pre), skip_symbolic_shape=skip_symbolic)
            except Exception:
                continue
        model_in, preprocessed = pre, True
        break
    ranges = None
    if torch_side is not None:
        model_in, ranges, report, sim = _calibrate_in_torch(model_in, tmp, scheme, source, per_channel, reduce_range,
                                                       block_size, *torch_side)
    if not (torch_side is not None and scheme == "w8a8" and not per_channel):
        model_in = _split_projections(model_in, tmp)  # one weight scale per tensor would change with the split
    with deps.quiet():
        try:
            if scheme == "w8-dynamic":
                quantize_dynamic(str(model_in), str(out), weight_type=QuantType.QInt8, reduce_range=reduce_range,
                                 op_types_to_quantize=list(WEIGHT_OPS))
            elif scheme == "w8a8":
                _quantize_w8a8(model_in, out, tmp, source, calibrator, per_channel, reduce_range, percentile, ranges)
            else:
                _quantize_w4(model_in, out, block_size, accuracy_level)
        except Exception as exc:  # ORT's quantizers raise assorted errors on unsupported graphs
            text = str(exc).strip().splitlines()
            raise QuantizationError(f"ONNX Runtime's {scheme} quantizer failed: {type(exc).__name__}: "
                                    f"{text[0] if text else ''}") from None
    return load_proto(out), preprocessed, report, sim


def _split_projections(model_in: Path, tmp: Path) -> Path:
    """The graph with fused q/k/v projections split into one weight ``MatMul`` each (after calibration:
    the parts keep the calibrated weights, and their shared input its range)."""
    proto = load_proto(model_in)
    if split_projections(proto) == 0:
        return model_in
    split = tmp / "split.onnx"
    split.write_bytes(serialize(proto))
    return split


def _calibrate_in_torch(model_in: Path, tmp: Path, scheme: str, source: CalibrationSource, per_channel: bool,
                        reduce_range: bool, block_size: int, torch_model: nn.Module, config: BlockwiseConfig,
                        log: Any) -> tuple[Path, dict[str, tuple[float, float]], dict[str, Any], nn.Module]:
    """Blockwise calibration of a simulated twin; its weights and ranges are written for ORT to take."""
    proto = load_proto(model_in)
    sites = layer_sites(proto, torch_model)
    plan = layer_plan(scheme, sites, per_channel=per_channel, reduce_range=reduce_range, block_size=block_size)
    if not plan:
        raise QuantizationError("none of the model's layers were found in the ONNX graph; pass the PyTorch model "
                                "the ONNX file was exported from")
    sim = build_simulation(torch_model, plan, sites)
    images = torch.cat(list(source.batches()))  # (N, C, S, S)
    report = calibrate_blockwise(sim, images, config, log or (lambda text: None))
    ranges = carry_calibration(proto, sim, {name: sites[name] for name in plan})
    calibrated = tmp / "calibrated.onnx"
    calibrated.write_bytes(serialize(proto))
    summary = report.to_dict()
    summary["layers"] = f"{len(plan)} of {len(weight_nodes(proto))}"
    summary["learned_rounding"] = sum(s.rounding == "learned" for s in report.stages)
    return calibrated, ranges, summary, sim


def _quantize_w8a8(model_in: Path, out: Path, tmp: Path, source: CalibrationSource, calibrator: str,
                   per_channel: bool, reduce_range: bool, percentile: float,
                   ranges: dict[str, tuple[float, float]] | None) -> None:
    """Static QDQ of the inputs of every Conv / Gemm / weight MatMul, outputs left in float.

    Ranges come from ORT's own calibrator, or as given (blockwise). ``quantize_static`` cannot
    pass histogram sizes to its calibrators, which leaves the entropy calibrator with as many bins
    as quantized levels (then it returns the min/max range), so the ranges are collected here
    with ORT's ``create_calibrator`` and handed over as its cache.
    """
    import numpy as np
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorsData, create_calibrator, save_tensors_data

    nodes = [n.name for n in weight_nodes(load_proto(model_in))]
    method = getattr(CalibrationMethod, ORT_CALIBRATORS.get(calibrator, "MinMax"))
    if ranges is not None:
        data = TensorsData(method, {k: (np.float32(lo), np.float32(hi)) for k, (lo, hi) in ranges.items()})
    else:
        options = {"entropy": {"num_bins": ENTROPY_BINS, "num_quantized_bins": 128},
                   "percentile": {"num_bins": PERCENTILE_BINS, "percentile": percentile, "symmetric": False},
                   "minmax": {}}[calibrator]
        calibrator_ = create_calibrator(model_in, list(WEIGHT_OPS), augmented_model_path=str(tmp / "augmented.onnx"),
                                        calibrate_method=method, extra_options=options)
        input_name = load_proto(model_in).graph.input[0].name
        calibrator_.collect_data(ort_reader(source, input_name))
        data = calibrator_.compute_data()
        del calibrator_
    cache = tmp / "ranges.json"
    save_tensors_data(data, cache)
    quantize_static(str(model_in), str(out), None, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(WEIGHT_OPS),
                    nodes_to_quantize=nodes, per_channel=per_channel, reduce_range=reduce_range,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method,
                    calibration_cache_path=str(cache),
                    extra_options={"OpTypesToExcludeOutputQuantization": list(WEIGHT_OPS)})


def _quantize_w4(model_in: Path, out: Path, block_size: int, accuracy_level: int | None) -> None:
    from onnxruntime.quantization import QuantFormat

    nbits = deps.nbits_quantizer()
    config = nbits.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True,
                                                accuracy_level=accuracy_level, quant_format=QuantFormat.QOperator,
                                                op_types_to_quantize=("MatMul",), bits=4)
    quantizer = nbits.MatMulNBitsQuantizer(load_proto(model_in), algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), False)


def _agreement(fp32: bytes, quantized: bytes, source: CalibrationSource | None, prep: Preprocessing,
               threads: int | None, tolerance: float | None) -> Agreement:
    from vitrim.quant.runtime import OnnxModel

    if source is None:
        images = torch.randn(CHECK_IMAGES, prep.in_chans, prep.image_size, prep.image_size,
                             generator=torch.Generator().manual_seed(0))
        source = calibration_source(images, None, prep)
    reference = OnnxModel(fp32, threads=threads, preprocessing=prep)
    candidate = OnnxModel(quantized, threads=threads, preprocessing=prep)
    return compare(reference, candidate, source.batches(), reference_name="ONNX Runtime fp32",
                   tolerance=tolerance)
