"""``vitrim export`` and ``vitrim quantize``: their parsers and commands.

``vitrim.cli`` owns the parser and calls :func:`register` for the two sub-commands; the shared
option helpers come from :mod:`vitrim.cli_common`, models from
:func:`vitrim.adapters.sources.load_model`, so this module imports nothing from ``vitrim.cli``.
"""

from __future__ import annotations

import argparse
import types
from pathlib import Path
from typing import Any

from vitrim.cli_common import (add_device, add_json, add_pretrained, add_threads, add_workers, check_batch_options,
                               command_line, default_of, emit, load_data_for, number, positive_float, positive_int,
                               resolve_model)
from vitrim.errors import ConfigError
from vitrim.fsutil import write_json

MODEL_HELP = "a model directory or a preset name (see `vitrim models`); presets without weights use random init"
CHECK_IMAGES = 8  # images export checks ONNX Runtime against PyTorch on, by default
CALIBRATED_IMAGES = 128  # calibration images of the schemes that calibrate, by default


def register(sub: Any) -> None:
    """Add the ``export`` and ``quantize`` sub-commands to ``vitrim``'s sub-parser object."""
    add_export_parser(sub)
    add_quantize_parser(sub)


def add_export_parser(sub: Any) -> None:
    """``vitrim export``: its defaults are :func:`vitrim.quant.export.export`'s."""
    from vitrim.quant.export import EXPORTERS, MIN_OPSET, export

    p = sub.add_parser("export", help="export to ONNX (checked against PyTorch in ONNX Runtime)")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--out", required=True, help="output .onnx file (written only if the check passes)")
    p.add_argument("--opset", type=positive_int, default=default_of(export, "opset"),
                   help=f"ONNX opset (>= {MIN_OPSET}; from 23 attention is one Attention node per block)")
    p.add_argument("--exporter", choices=EXPORTERS, default=default_of(export, "exporter"),
                   help="auto: torch.export-based, TorchScript only if that fails")
    p.add_argument("--tolerance", type=positive_float, default=default_of(export, "tolerance"),
                   help="max abs logit difference allowed")
    p.add_argument("--check-images", type=positive_int, default=CHECK_IMAGES, help="images for the numeric check")
    _add_data_args(p, "check on this dataset's first images (default: seeded random images)", "test")
    add_pretrained(p)
    add_threads(p)
    add_json(p)
    p.set_defaults(func=cmd_export)


def add_quantize_parser(sub: Any) -> None:
    """``vitrim quantize``: its defaults are :func:`vitrim.quant.quantize.quantize`'s and the option classes'."""
    from vitrim.quant.quantize import CALIBRATORS, SCHEMES, quantize

    p = sub.add_parser("quantize", help="int8 / 4-bit quantization through ONNX Runtime, or an integer-only simulation",
                       description="Quantize a model. The ORT schemes write DIR/model.onnx (run it with `vitrim eval` "
                                   "/ `vitrim bench`); --scheme int-only writes an integer-only PyTorch simulation "
                                   "(I-ViT style) that `vitrim eval DIR` runs. Calibrators: ONNX Runtime's minmax, "
                                   "entropy, percentile, or blockwise (stage-by-stage clipping search and learned "
                                   "rounding in PyTorch, carried into the ORT model; needs the model directory or "
                                   "preset, not a .onnx file).")
    p.add_argument("model", help=MODEL_HELP + "; or a .onnx file written by `vitrim export`")
    p.add_argument("--scheme", choices=[*SCHEMES, "int-only"], default=default_of(quantize, "scheme"),
                   help="w8-dynamic: int8 weights, dynamic activations | w8a8: static int8 QDQ of every linear "
                        "layer's input and weights, calibrated | w4: 4-bit block-wise weights (MatMulNBits) | "
                        "int-only: integer-only inference simulated in PyTorch (Shiftmax, integer GELU and "
                        "LayerNorm, dyadic requantization)")
    p.add_argument("--calib", type=positive_int, default=None,
                   help=f"calibration images (default {CALIBRATED_IMAGES} for w8a8, blockwise and int-only; other "
                        f"schemes use them for the check only)")
    p.add_argument("--calib-method", choices=list(CALIBRATORS), default=default_of(quantize, "calibrator"),
                   help="w8a8: any; w4: minmax (ORT's round-to-nearest) or blockwise")
    p.add_argument("--percentile", type=number(0, 100, low_open=True), default=default_of(quantize, "percentile"),
                   help="percentile calibrator's percentile")
    p.add_argument("--block-size", type=positive_int, default=default_of(quantize, "block_size"),
                   help="w4 weights per scale (power of 2)")
    p.add_argument("--no-per-channel", action="store_true", help="w8a8: one scale per weight tensor")
    _add_blockwise_args(p)
    p.add_argument("--out", required=True, help="output directory (receives model.onnx and quantize.json)")
    _add_data_args(p, "calibration dataset", "train")
    add_pretrained(p)
    add_threads(p)
    add_device(p, "ONNX Runtime, its calibration and the checks against PyTorch run on the CPU in this "
                  "version (the device is checked only)")
    add_json(p)
    p.set_defaults(func=cmd_quantize)


def _add_blockwise_args(p: argparse.ArgumentParser) -> None:
    from vitrim.quant.blockwise import ROUNDINGS, BlockwiseConfig
    from vitrim.quant.intonly import GELUS, IntOnlyOptions

    g = p.add_argument_group("blockwise calibration")
    g.add_argument("--rounding", choices=ROUNDINGS, default=default_of(BlockwiseConfig, "rounding"),
                   help="learned: AdaRound-style per block, kept only where it beats nearest rounding")
    g.add_argument("--round-steps", type=positive_int, default=default_of(BlockwiseConfig, "steps"),
                   help="learned-rounding steps per block")
    g.add_argument("--search-images", type=positive_int, default=default_of(BlockwiseConfig, "search_images"),
                   help="images the clipping search scores each candidate on")
    g = p.add_argument_group("int-only")
    g.add_argument("--int-gelu", choices=GELUS, default=default_of(IntOnlyOptions, "gelu"),
                   help="shift: I-ViT's ShiftGELU | poly: I-BERT's polynomial GELU (closer without retraining)")
    g.add_argument("--residual-bits", type=positive_int, default=default_of(IntOnlyOptions, "residual_bits"),
                   help="width of the residual stream (8 or 16)")


def _add_data_args(p: argparse.ArgumentParser, help_text: str, split: str) -> None:
    p.add_argument("--data", default=None, help=f"{help_text}: fashion-mnist | idx:DIR | folder:DIR"
                   + (" | coco:DIR (dense models)" if split == "test" else ""))
    p.add_argument("--data-dir", default=None, help="directory holding the Fashion-MNIST IDX files")
    p.add_argument("--split", default=split, choices=["train", "test"])
    p.add_argument("--resize", action="store_true", help="resize images to the model's input size")
    add_workers(p)


def _images(model_config: Any, args: argparse.Namespace, count: int) -> Any:
    """The first ``count`` images of ``--data``/``--split``, checked against the model's input."""
    from vitrim.quant.errors import CalibrationError

    args.limit = None
    data = load_data_for(types.SimpleNamespace(config=model_config), args, args.split)
    if len(data) < count:
        raise CalibrationError(f"{args.data}/{args.split} has {len(data)} images, asked for {count}; "
                               f"lower the count or use a larger split")
    return data.subset(count)


def cmd_export(args: argparse.Namespace) -> None:
    """``vitrim export``: export to ONNX, checked against PyTorch in ONNX Runtime."""
    from vitrim.bench.latency import fixed_threads
    from vitrim.cli_dense import dense_check_images, is_coco
    from vitrim.fsutil import check_output_file
    from vitrim.quant.export import export
    from vitrim.report import human

    check_output_file(args.out, "--out file")
    model, weights = resolve_model(args.model, allow_random=True, pretrained=args.pretrained)
    check_batch_options(model, args)
    images = None
    if is_coco(args.data):  # a dense model checked on its own task's images
        images = dense_check_images(args, model, args.check_images)
    elif args.data:
        images = _images(model.config, args, args.check_images)
    if images is None:
        import torch

        cfg = model.config
        images = torch.randn(args.check_images, cfg.in_chans, cfg.image_size, cfg.image_size,
                             generator=torch.Generator().manual_seed(0))
    with fixed_threads(args.threads):
        result = export(model, args.out, opset=args.opset, check_images=images, tolerance=args.tolerance,
                        exporter=args.exporter, threads=args.threads)
    data = {"model": args.model, "weights": weights, **result.to_dict()}
    reason = result.fallback_reason
    note = "" if not reason else f" (fell back: {reason})" if result.exporter != args.exporter else f" ({reason})"
    emit(args, data, f"exported {args.model} ({weights} weights) to {result.path}: {result.exporter} exporter"
                     f"{note}, opset {result.opset}, {human(result.size_bytes, 'B')}\n"
                     f"check: {result.check.summary()}")


def cmd_quantize(args: argparse.Namespace) -> None:
    """``vitrim quantize``: int8 / 4-bit through ONNX Runtime, or the integer-only simulation."""
    import sys

    from vitrim.adapters.sources import is_runtime_spec
    from vitrim.bench.latency import fixed_threads
    from vitrim.quant.blockwise import BlockwiseConfig
    from vitrim.quant.errors import QuantConfigError
    from vitrim.quant.metadata import Preprocessing, read_props
    from vitrim.quant.onnxfile import load_proto
    from vitrim.quant.quantize import output_file, quantize

    from vitrim.fsutil import atomic_dir, check_output_dir

    out_dir = Path(args.out)
    if out_dir.suffix == ".onnx" or out_dir.is_file():
        raise ConfigError(f"--out is a directory (it receives the model and quantize.json), got {out_dir}")
    check_output_dir(out_dir, "--out directory")
    int_only = args.scheme == "int-only"
    if int_only and args.calib_method != "minmax":
        raise QuantConfigError("int-only sets its scales from the calibration images' min/max ranges; "
                               "drop --calib-method")
    if is_runtime_spec(args.model):
        if int_only or args.calib_method == "blockwise":
            what = "--scheme int-only" if int_only else "--calib-method blockwise"
            raise QuantConfigError(f"{what} runs the model in PyTorch; give the model directory or preset, "
                                   f"not the .onnx file")
        source: Any = load_proto(args.model)
        prep = Preprocessing.from_props(read_props(source), args.model)
        config, weights = prep.config or prep, "onnx"
    else:
        source, weights = resolve_model(args.model, allow_random=True, pretrained=args.pretrained)
        config = source.config
    calibrated = args.scheme == "w8a8" or args.calib_method == "blockwise" or int_only
    count = args.calib or (CALIBRATED_IMAGES if calibrated else None)
    calib = None
    if count is not None:
        if args.data is None:
            args.data = "fashion-mnist"
        calib = _images(config, args, count)
    log = (lambda text: None) if args.json else (lambda text: print(text, file=sys.stderr, flush=True))
    command = command_line(args)
    with fixed_threads(args.threads), atomic_dir(out_dir) as tmp:  # the model and its record appear together
        if int_only:
            result = _int_only(args, source, tmp, calib, count)
        else:
            blockwise = BlockwiseConfig(rounding=args.rounding, steps=args.round_steps,
                                        search_images=args.search_images)
            result = quantize(source, output_file(tmp), args.scheme, calib=calib, calib_size=count,
                              calibrator=args.calib_method, per_channel=not args.no_per_channel,
                              percentile=args.percentile, block_size=args.block_size, threads=args.threads,
                              blockwise=blockwise, log=log)
        result.path = out_dir / Path(result.path).relative_to(tmp)
        data = {"model": args.model, "weights": weights, "command": command, **result.to_dict()}
        write_json(tmp / "quantize.json", data)
    emit(args, data, _summary(args.model, weights, result))


def _int_only(args: argparse.Namespace, model: Any, out_dir: Path, calib: Any, count: int) -> Any:
    from vitrim.quant.intonly import IntOnlyOptions
    from vitrim.quant.intonly_file import quantize_int_only

    options = IntOnlyOptions(residual_bits=args.residual_bits, gelu=args.int_gelu)
    return quantize_int_only(model, out_dir, calib=calib, calib_size=count, options=options)


def _summary(model: str, weights: str, result: Any) -> str:
    from vitrim.report import human

    scheme = result.to_dict()["scheme"]
    calibrator = getattr(result, "calibrator", None)
    method = f", {calibrator} calibration on {result.calib_images} images" if calibrator else ""
    where = result.path if scheme != "int-only" else f"{result.path} (run it with `vitrim eval {result.path}`)"
    return (f"quantized {model} ({weights}) with {scheme}{method} to {where}: {human(result.size_bytes, 'B')} vs "
            f"fp32 {human(result.fp32_size_bytes, 'B')} ({result.compression:.2f}x smaller)\n"
            f"check: {result.check.summary()}")
