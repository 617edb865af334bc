"""Quantization on the bundled Fashion-MNIST reference, plus latency and size on a DeiT-S-shaped model.

Reference model (accuracy on the test set, size on disk, latency at batch 1 and 64): torch fp32,
ORT fp32, ORT w8-dynamic, ORT w8a8 with each calibrator (minmax, entropy, percentile,
blockwise), ORT w4 (round-to-nearest and blockwise, per block size), the integer-only
simulation (ShiftGELU and polynomial GELU), and the stacked `vitrim compress` pipeline. Every
latency is measured in this process, alternating with ORT fp32 (median, fixed threads); the
integer-only simulation's latency is not measured (it is a PyTorch simulation of integer
hardware, not a kernel). DeiT-S shape (224x224, random weights): size and latency only.

    python benchmarks/quant_benchmark.py
    python benchmarks/quant_benchmark.py --quick   # smoke test: few images, few runs
    python benchmarks/quant_benchmark.py --model fmnist-vit-197 --variants w8a8:blockwise w4:minmax w4:blockwise
    python benchmarks/quant_benchmark.py --model fmnist-vit-197 --compare-opset 18  # also the opset-18 graph
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, load_reference, write_results  # noqa: E402

import vitrim  # noqa: E402
from vitrim.adapters.sources import load_model  # noqa: E402
from vitrim.bench.latency import paired_latency  # noqa: E402
from vitrim.compress import CompressConfig, compress, torch_size  # noqa: E402
from vitrim.data import load_dataset  # noqa: E402
from vitrim.quant import CALIBRATORS, OnnxModel, export, quantize  # noqa: E402
from vitrim.quant.export import DEFAULT_OPSET  # noqa: E402
from vitrim.quant.blockwise import BlockwiseConfig  # noqa: E402
from vitrim.quant.intonly import IntOnlyOptions, int_only  # noqa: E402

AIMS = {"w8a8_blockwise_drop": 0.3, "int8_speedup_b64": 2.5, "int8_speedup_b1": 2.0, "size_ratio": 7.9,
        "size_drop": 1.0, "compress_speedup": 10.0, "compress_drop": 1.0}


def timed(reference: Any, model: Any, args: argparse.Namespace, batches: list[int]) -> dict[str, float]:
    """Latency of ``model`` and its speedup over ``reference`` (ORT fp32), timed alternately."""
    out: dict[str, float] = {}
    for batch in batches:
        lat = paired_latency(reference, model, batch, threads=args.threads, runs=args.runs)
        out[f"ms_b{batch}"] = lat["second_ms"]
        out[f"vs_ort_fp32_b{batch}"] = lat["speedup"]
    return out


def reference_rows(args: argparse.Namespace, work: Path) -> tuple[list[dict[str, Any]], float, int]:
    dense, test, dense_acc = load_reference(args.model, args.threads, args.eval_limit)
    calib = load_dataset("fashion-mnist", "train").subset(args.calib).resized(dense.config.image_size)
    fp32 = export(dense, work / "fp32.onnx", opset=args.opset, threads=args.threads)
    ort_fp32 = OnnxModel(fp32.path, threads=args.threads)
    rows: list[dict[str, Any]] = []

    def add(name: str, model: Any, size: int, latency: bool = True, **extra: Any) -> None:
        acc = dense_acc if model is dense else vitrim.evaluate(model, test)["accuracy"]
        row = {"name": name, "accuracy": acc, "drop_points": (dense_acc - acc) * 100, "size_bytes": size,
               "size_ratio": torch_size(dense) / size, **extra}
        if latency:
            row.update(timed(ort_fp32, model, args, [1, 64]))
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "calibration"},
              flush=True)

    add("torch fp32", dense, torch_size(dense))
    add("ORT fp32", ort_fp32, fp32.size_bytes)
    blockwise = BlockwiseConfig(steps=args.round_steps, search_images=min(args.search_images, args.calib))
    for scheme, calibrator, block in variants(args):
        started = time.perf_counter()
        result = quantize(fp32.path, work / f"{scheme}-{calibrator}-{block}.onnx", scheme, calib=calib,
                          calibrator=calibrator, block_size=block, threads=args.threads, torch_model=dense,
                          blockwise=blockwise)
        label = {"w8-dynamic": "ORT w8-dynamic", "w8a8": f"ORT w8a8 {calibrator}",
                 "w4": f"ORT w4 b{block} {'rtn' if calibrator == 'minmax' else calibrator}"}[scheme]
        add(label, OnnxModel(result.path, threads=args.threads), result.size_bytes, scheme=scheme,
            calibrator=calibrator, quantize_seconds=time.perf_counter() - started,
            calibration=result.calibration)
    if args.compare_opset is not None:  # the same rows from the graph an older opset exports
        old = export(dense, work / f"fp32-opset{args.compare_opset}.onnx", opset=args.compare_opset,
                     threads=args.threads)
        add(f"ORT fp32 (opset {args.compare_opset})", OnnxModel(old.path, threads=args.threads), old.size_bytes)
        result = quantize(old.path, work / f"w8a8-opset{args.compare_opset}.onnx", "w8a8", calib=calib,
                          threads=args.threads)
        add(f"ORT w8a8 minmax (opset {args.compare_opset})", OnnxModel(result.path, threads=args.threads),
            result.size_bytes)
    images = torch.cat([x for x, _ in calib.batches(64, image_size=dense.config.image_size)]).float()
    for gelu in ("shift", "poly") if selected(args, "int-only") else ():
        twin = int_only(dense, images, IntOnlyOptions(gelu=gelu))
        add(f"int-only sim ({gelu} GELU)", twin, twin.size_bytes(), latency=False, scheme="int-only")
    if args.compress:
        rows.append(compress_row(dense, test, args, work / "compressed"))
    return rows, dense_acc, len(test)


VARIANTS = ("w8-dynamic", "w8a8:minmax", "w8a8:entropy", "w8a8:percentile", "w8a8:blockwise", "w4:minmax",
            "w4:blockwise", "int-only")


def selected(args: argparse.Namespace, variant: str) -> bool:
    return args.variants is None or variant in args.variants


def variants(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """``(scheme, calibrator, block size)`` of the quantized rows ``--variants`` keeps (default: all)."""
    grid = [("w8-dynamic", "minmax", 32)] + [("w8a8", c, 32) for c in ("minmax", "entropy", "percentile", "blockwise")]
    grid += [("w4", c, b) for b in args.w4_block_sizes for c in ("minmax", "blockwise")]
    return [(s, c, b) for s, c, b in grid if selected(args, s if s == "w8-dynamic" else f"{s}:{c}")]


def compress_row(dense: Any, test: Any, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    train = load_dataset("fashion-mnist", "train").resized(dense.config.image_size)
    cfg = CompressConfig(prune=args.compress_prune, prune_calib=args.prune_calib, tokens=args.compress_tokens,
                         token_layers=args.compress_layers, quant="w8a8", calib=args.calib, calib_method=args.compress_calib_method,
                         threads=args.threads, runs=args.runs)
    report = compress(dense, train, test, cfg, out, progress=False)
    last = report["stages"][-1]
    row = {"name": f"vitrim compress ({last['stage']})", "accuracy": last["accuracy"],
           "drop_points": last["drop_points"], "size_bytes": last["size_bytes"], "size_ratio": last["size_ratio"],
           "vs_torch_fp32_b1": last["speedup_b1"], "vs_torch_fp32_b64": last["speedup_b64"],
           "ms_b1": last["latency_ms_b1"], "ms_b64": last["latency_ms_b64"], "stages": report["stages"]}
    print({k: v for k, v in row.items() if k != "stages"}, flush=True)
    return row


def deit_rows(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    model = load_model("vit-small", allow_random=True).model  # random init, seed 0
    check = torch.randn(args.deit_calib, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    fp32 = export(model, work / "deit-fp32.onnx", opset=args.opset, check_images=check[:2], threads=args.threads)
    ort_fp32 = OnnxModel(fp32.path, threads=args.threads)
    rows = [{"name": "torch fp32", "size_bytes": torch_size(model), **timed(ort_fp32, model, args, args.deit_batches)},
            {"name": "ORT fp32", "size_bytes": fp32.size_bytes, **timed(ort_fp32, ort_fp32, args, args.deit_batches)}]

    def add(name: str, path: Path, size: int) -> None:
        rows.append({"name": name, "size_bytes": size,
                     **timed(ort_fp32, OnnxModel(path, threads=args.threads), args, args.deit_batches)})
        print(rows[-1], flush=True)

    for scheme in ("w8-dynamic", "w8a8", "w4"):
        result = quantize(fp32.path, work / f"deit-{scheme}.onnx", scheme, calib=check, threads=args.threads)
        add(f"ORT {scheme}", result.path, result.size_bytes)
    if args.compare_opset is not None:  # the same rows from the graph an older opset exports
        tag = f"opset{args.compare_opset}"
        old = export(model, work / f"deit-fp32-{tag}.onnx", opset=args.compare_opset, check_images=check[:2],
                     threads=args.threads)
        add(f"ORT fp32 (opset {args.compare_opset})", old.path, old.size_bytes)
        result = quantize(old.path, work / f"deit-w8a8-{tag}.onnx", "w8a8", calib=check, threads=args.threads)
        add(f"ORT w8a8 (opset {args.compare_opset})", result.path, result.size_bytes)
    for row in rows:
        row["size_ratio"] = rows[0]["size_bytes"] / row["size_bytes"]
    return rows


def aims(rows: list[dict[str, Any]]) -> list[tuple[str, str, bool]]:
    by = {r["name"]: r for r in rows}
    out: list[tuple[str, str, bool]] = []
    bw = by.get("ORT w8a8 blockwise")
    if bw is not None:
        out.append((f"w8a8 blockwise drop <= {AIMS['w8a8_blockwise_drop']} pt", f"{bw['drop_points']:+.2f} pt",
                    bw["drop_points"] <= AIMS["w8a8_blockwise_drop"]))
    for name in ("ORT w8a8 blockwise", "ORT w8-dynamic"):
        r = by.get(name)
        if r is None:
            continue
        for batch, key in ((64, "int8_speedup_b64"), (1, "int8_speedup_b1")):
            out.append((f"{name} >= {AIMS[key]}x faster than ORT fp32 at batch {batch}",
                        f"{r[f'vs_ort_fp32_b{batch}']:.2f}x", r[f"vs_ort_fp32_b{batch}"] >= AIMS[key]))
    fits = [r for r in rows if r["drop_points"] <= AIMS["size_drop"]]
    best = max(fits, key=lambda r: r["size_ratio"])
    out.append((f"size >= {AIMS['size_ratio']}x smaller than fp32 at <= {AIMS['size_drop']} pt drop",
                f"{best['size_ratio']:.2f}x ({best['name']}, {best['drop_points']:+.2f} pt)",
                best["size_ratio"] >= AIMS["size_ratio"]))
    ort_best = max((r for r in rows if r.get("scheme") == "w8a8" and r["calibrator"] != "blockwise"),
                   key=lambda r: r["accuracy"], default=None)
    if bw is not None and ort_best is not None:
        out.append(("blockwise beats ORT's best calibrator at w8a8",
                    f"{bw['accuracy'] * 100:.2f}% vs {ort_best['accuracy'] * 100:.2f}% ({ort_best['calibrator']})",
                    bw["accuracy"] > ort_best["accuracy"]))
    for r in rows:
        rtn = by.get(r["name"].replace("blockwise", "rtn"))
        if r.get("scheme") == "w4" and r["calibrator"] == "blockwise" and rtn is not None:
            out.append((f"blockwise beats ORT's round-to-nearest at 4-bit ({r['name'].split()[2]})",
                        f"{r['accuracy'] * 100:.2f}% vs {rtn['accuracy'] * 100:.2f}%", r["accuracy"] > rtn["accuracy"]))
    stacked = next((r for r in rows if r["name"].startswith("vitrim compress")), None)
    if stacked is not None:
        for batch in (1, 64):
            speed = stacked[f"vs_torch_fp32_b{batch}"]
            out.append((f"compress >= {AIMS['compress_speedup']}x faster than dense torch fp32 at batch {batch}, "
                        f"<= {AIMS['compress_drop']} pt drop", f"{speed:.2f}x, {stacked['drop_points']:+.2f} pt",
                        speed >= AIMS["compress_speedup"] and stacked["drop_points"] <= AIMS["compress_drop"]))
    return out


def latency_cells(row: dict[str, Any], batch: int) -> str:
    if f"ms_b{batch}" not in row:
        return "n/a | n/a"
    ratio = row.get(f"vs_ort_fp32_b{batch}")
    note = f"{ratio:.2f}x" if ratio is not None else f"{row[f'vs_torch_fp32_b{batch}']:.2f}x vs torch"
    return f"{row[f'ms_b{batch}']:.2f} | {note}"


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [f"# Quantization benchmark: {result['model']}", "",
             f"Dense torch fp32 accuracy {result['dense_accuracy'] * 100:.2f}% on {result['test_images']} test "
             f"images; {result['calib']} calibration images from the training split; {env['threads']} threads, "
             f"{result['runs']} timed runs per model. Command: `{env['command']}`", "",
             "| model | accuracy | drop (pt) | size | smaller | ms b=1 | vs ORT fp32 | ms b=64 | vs ORT fp32 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['accuracy'] * 100:.2f}% | {r['drop_points']:+.2f} | "
                     f"{r['size_bytes'] / 1e6:.2f} MB | {r['size_ratio']:.2f}x | {latency_cells(r, 1)} | "
                     f"{latency_cells(r, 64)} |")
    lines += ["", "Integer-only rows: size of the integer constants at their widths; latency not measured "
              "(a PyTorch simulation of integer hardware).", "", "## Aims", "", "| aim | measured | met |",
              "|---|---|---|"]
    lines += [f"| {aim} | {value} | {'met' if ok else 'missed'} |" for aim, value, ok in result["aims"]]
    for r in (r for r in result["rows"] if "stages" in r):
        lines += ["", f"## {r['name']}, stage by stage (speed-ups against dense torch fp32 eager)", "",
                  "| stage | accuracy | drop (pt) | FLOPs kept | size | speed-up b=1 | speed-up b=64 |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {st['stage']} | {st['accuracy'] * 100:.2f}% | {st['drop_points']:+.2f} | "
                  f"{st['flops'] / r['stages'][0]['flops']:.3f} | {st['size_bytes'] / 1e6:.2f} MB | "
                  f"{st['speedup_b1']:.2f}x | {st['speedup_b64']:.2f}x |" for st in r["stages"]]
    if result.get("deit"):
        batches = result["deit_batches"]
        lines += ["", "## DeiT-S shape (224x224, random weights): size and latency", "",
                  "| model | size | smaller | " + " | ".join(f"ms b={b} | vs ORT fp32" for b in batches) + " |",
                  "|---|---|---|" + "---|---|" * len(batches)]
        for r in result["deit"]:
            cells = " | ".join(f"{r[f'ms_b{b}']:.1f} | {r[f'vs_ort_fp32_b{b}']:.2f}x" for b in batches)
            lines.append(f"| {r['name']} | {r['size_bytes'] / 1e6:.1f} MB | {r['size_ratio']:.2f}x | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fmnist-vit")
    parser.add_argument("--calib", type=int, default=256, help="calibration images (training split)")
    parser.add_argument("--eval-limit", type=int, default=None, help="first N test images (default all)")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per model and batch size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset of the exported model")
    parser.add_argument("--compare-opset", type=int, default=None,
                        help="also time ORT fp32 and w8a8 minmax exported at this opset (e.g. 18)")
    parser.add_argument("--round-steps", type=int, default=200, help="blockwise learned-rounding steps per block")
    parser.add_argument("--search-images", type=int, default=64)
    parser.add_argument("--w4-block-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                        help="quantized rows to run (default: all); torch and ORT fp32 always run")
    parser.add_argument("--no-compress", dest="compress", action="store_false", help="skip the stacked pipeline")
    parser.add_argument("--compress-prune", default="flops=0.5")
    parser.add_argument("--compress-tokens", default="keep=0.7")
    parser.add_argument("--compress-layers", type=lambda v: tuple(int(i) for i in v.split(",")), default=None,
                        help="blocks after which the stacked pipeline merges tokens (default: vitrim's)")
    parser.add_argument("--compress-calib-method", default="blockwise", choices=CALIBRATORS)
    parser.add_argument("--prune-calib", type=int, default=512)
    parser.add_argument("--no-deit", dest="deit", action="store_false", help="skip the DeiT-S latency part")
    parser.add_argument("--deit-batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--deit-runs", type=int, default=10)
    parser.add_argument("--deit-calib", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="smoke test: 64 test / 32 calibration images, 3 runs")
    parser.add_argument("--name", default="quant_benchmark")
    args = parser.parse_args()
    if args.quick:
        args.eval_limit, args.calib, args.runs, args.round_steps = 64, 32, 3, 10
        args.search_images, args.prune_calib, args.deit_runs, args.deit_calib = 16, 64, 1, 2
        args.deit_batches, args.w4_block_sizes = [1, 2], [32]
        args.name += "_quick"
    if args.variants is not None and args.name == parser.get_default("name"):
        args.name += "_partial"  # a selection of rows never replaces the full results
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vitrim-quant-bench-") as tmp:
        rows, dense_acc, test_images = reference_rows(args, Path(tmp))
        deit = None
        if args.deit:
            runs, args.runs = args.runs, args.deit_runs
            deit = deit_rows(args, Path(tmp))
            args.runs = runs
    result = {"environment": environment(), "model": args.model, "dense_accuracy": dense_acc,
              "test_images": test_images, "calib": args.calib,
              "runs": args.runs, "rows": rows, "aims": aims(rows), "deit": deit, "deit_batches": args.deit_batches,
              "seconds": time.perf_counter() - started}
    write_results(args.name, result, markdown(result))


if __name__ == "__main__":
    main()
