"""Where the time goes at 197 tokens: each kind of operator's share of one forward pass, for the
dense model, a pruned one, merged tokens, ONNX Runtime fp32 / int8 and a stacked setting (pruned
to 0.3 of the FLOPs, merged at keep 0.5, w8-dynamic: the fastest of the joint benchmark's grids),
at batch 1 and 64.

PyTorch models run under ``torch.profiler`` (self time per aten op, and the inclusive time spent
inside the token reducer's ``record``/``reduce``); ONNX Runtime sessions under ORT's own profiler
(kernel time per graph node). "outside operators" is the profiled forward's wall time minus the
operators' summed time: Python, module dispatch and the runtime's own bookkeeping. Attention is
one fused kernel in torch; in ONNX its products are MatMul nodes whose inputs are both 4-D
(B, H, N, d), counted as attention here too. Accuracy is not measured; the models are built
training-free.

    python benchmarks/profile_197.py --model fmnist-vit-197 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, write_results  # noqa: E402

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import vitrim  # noqa: E402
from vitrim.bench.latency import time_callable  # noqa: E402
from vitrim.data import load_dataset  # noqa: E402

REDUCTION = "token reduction"
ATTENTION = "attention (QK^T, softmax, AV)"

# (category, substrings of an aten op or ORT node type), first match wins; lower-case
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("quantize / dequantize", ("quantizelinear",)),  # also DequantizeLinear, DynamicQuantizeLinear
    (ATTENTION, ("scaled_dot_product", "softmax", "attention")),
    ("convolution (patch embedding)", ("conv",)),
    ("linear / matmul", ("addmm", "aten::mm", "bmm", "matmul", "aten::linear", "gemm")),
    ("layer norm", ("layer_norm", "layernorm")),
    ("gelu", ("gelu", "erf")),
    ("sort / top-k / gather / scatter", ("sort", "topk", "gather", "scatter", "index", "argmax", "max")),
    ("elementwise and copies", ("add", "mul", "div", "sub", "copy", "clone", "cat", "contiguous", "fill",
                                "where", "norm", "sum", "mean", "sqrt", "pow", "exp", "log", "expand", "qlinear",
                                "concat", "transpose", "reshape", "cast", "slice", "unsqueeze", "squeeze",
                                "split", "to", "empty", "zeros", "ones", "arange")),
]


def category(op: str) -> str:
    name = op.lower()
    for label, keys in CATEGORIES:
        if any(k in name for k in keys):
            return label
    return "other"


def onnx_category(node: dict[str, Any]) -> str:
    """A node's category from its profile args; a MatMul of two 4-D activations is attention."""
    op = node.get("op_name", "")
    shapes = [next(iter(t.values())) for t in node.get("input_type_shape", [])]
    if op == "MatMul" and len(shapes) == 2 and all(len(s) == 4 for s in shapes):
        return ATTENTION
    return category(op)


def profile_torch(model: torch.nn.Module, x: torch.Tensor, runs: int) -> dict[str, Any]:
    """Self time per op category (ms per forward), the reducer's inclusive time, the wall time."""
    with torch.inference_mode():
        wall = time_callable(lambda: model(x), warmup=3, runs=runs)["median_ms"]
        with reducer_annotated(model), profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(runs):
                model(x)
            profiled = (time.perf_counter() - start) * 1000 / runs
    ops: dict[str, float] = defaultdict(float)
    reduction = 0.0
    for event in prof.key_averages():
        if event.key == REDUCTION:
            reduction = event.cpu_time_total / 1000 / runs
        elif event.key.startswith("aten::") or event.key.startswith("mkldnn"):
            ops[category(event.key)] += event.self_cpu_time_total / 1000 / runs
    return {"wall_ms": wall, "profiled_ms": profiled, "categories": dict(ops), "reduction_ms": reduction}


@contextmanager
def reducer_annotated(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, the token reducer's work (choosing and merging tokens, whatever ops it
    runs) shows in the profile as one :data:`REDUCTION` range per call."""
    reducer = getattr(model, "reducer", None)
    names = ("record", "reduce") if reducer is not None else ()
    for name in names:
        setattr(reducer, name, _annotated(getattr(reducer, name)))
    try:
        yield
    finally:
        for name in names:
            delattr(reducer, name)  # the class's own methods again


def _annotated(fn: Callable) -> Callable:
    def run(*args: Any, **kwargs: Any) -> Any:
        with record_function(REDUCTION):
            return fn(*args, **kwargs)

    return run


def profile_onnx(path: Path, x: torch.Tensor, runs: int, threads: int, work: Path) -> dict[str, Any]:
    """Time per node-type category (ms per forward) from ORT's profiler, and the wall time."""
    from vitrim.quant.onnxfile import session

    feed = x.numpy()
    plain = session(path, threads)
    name = plain.get_inputs()[0].name
    wall = time_callable(lambda: plain.run(None, {name: feed}), warmup=3, runs=runs)["median_ms"]
    recording = session(path, threads, profile_prefix=str(work / path.stem))
    recording.run(None, {name: feed})
    start = time.perf_counter()
    for _ in range(runs):
        recording.run(None, {name: feed})
    profiled = (time.perf_counter() - start) * 1000 / runs
    events = json.loads(Path(recording.end_profiling()).read_text())
    first = min((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    timed_from = first["ts"] + first["dur"]  # the warm-up run allocates; leave it out
    ops: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= timed_from:
            ops[onnx_category(e["args"])] += e["dur"] / 1000 / runs
    return {"wall_ms": wall, "profiled_ms": profiled, "categories": dict(ops), "reduction_ms": 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fmnist-vit-197")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--runs", type=int, default=20, help="forwards per model and batch (batch 64: a quarter)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="profile_197")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from vitrim.quant import export, quantize
    from vitrim.tokens import reduce_tokens

    dense = vitrim.load(args.model).eval()
    train = load_dataset("fashion-mnist", "train").resized(dense.config.image_size)
    size = dense.config.image_size
    depth = dense.config.depth
    every = tuple(range(depth - 1))
    pruned = {r: vitrim.prune(dense, f"flops={r:g}", train, recover="none", calib_images=256,
                              progress=False).model.eval() for r in (0.5, 0.3)}
    torch_models = {
        "dense (torch)": dense,
        "pruned flops 0.5 (torch)": pruned[0.5],
        "merged keep 0.7, every block (torch)": reduce_tokens(dense, "tome", layers=every, keep=0.7),
        "merged keep 0.5 @1,2,3,4 (torch)": reduce_tokens(dense, "tome", layers=(1, 2, 3, 4), keep=0.5),
    }
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vitrim-profile-") as tmp:
        work = Path(tmp)
        calib = train.subset(64)
        onnx_models = {"dense (ORT fp32)": export(dense, work / "dense-fp32.onnx").path}
        onnx_models["dense (ORT w8a8)"] = quantize(dense, work / "dense-w8a8.onnx", "w8a8", calib=calib,
                                                   threads=args.threads).path
        onnx_models["dense (ORT w8-dynamic)"] = quantize(dense, work / "dense-w8dyn.onnx", "w8-dynamic",
                                                         threads=args.threads).path
        stacked = reduce_tokens(pruned[0.3], "tome", layers=(1, 2, 3, 4), keep=0.5)
        onnx_models["stacked: pruned 0.3 + keep 0.5 + w8-dynamic (ORT)"] = quantize(
            stacked, work / "stacked.onnx", "w8-dynamic", threads=args.threads).path
        for batch in args.batches:
            x = torch.randn(batch, dense.config.in_chans, size, size)
            runs = args.runs if batch == 1 else max(5, args.runs // 4)
            for label, model in torch_models.items():
                print(f"batch {batch}: {label}", flush=True)
                rows.append({"model": label, "batch": batch, **profile_torch(model, x, runs)})
            for label, path in onnx_models.items():
                print(f"batch {batch}: {label}", flush=True)
                rows.append({"model": label, "batch": batch,
                             **profile_onnx(Path(path), x, runs, args.threads, work)})
    write_results(args.name, {"environment": environment(), "model": args.model, "rows": rows},
                  markdown(args, rows))


def markdown(args: argparse.Namespace, rows: list[dict[str, Any]]) -> str:
    labels = [c for c, _ in CATEGORIES] + ["other"]
    md = [f"# Where the time goes: {args.model}", "",
          f"Share of one profiled forward pass per kind of operator, {args.threads} threads; ms per forward "
          f"in brackets (profiled: each operator a little slower than unprofiled). The token reducer's "
          f"column is inclusive (its operators also count in their own columns) and a lower bound: the "
          f"proportional-attention bias its merges cause in later blocks counts elsewhere. "
          f"Command: `{environment()['command']}`", ""]
    for batch in args.batches:
        md += [f"## Batch {batch}", "",
               "| model | ms (unprofiled) | " + " | ".join(labels) + " | outside operators | inside the token reducer |",
               "|---|---|" + "---|" * (len(labels) + 2)]
        for r in (r for r in rows if r["batch"] == batch):
            wall = r["profiled_ms"]
            cells = [f"{r['categories'].get(c, 0.0) / wall * 100:.0f}% ({r['categories'].get(c, 0.0):.2f})"
                     if r["categories"].get(c, 0.0) else "–" for c in labels]
            outside = max(0.0, wall - sum(r["categories"].values()))
            reducer = f"{r['reduction_ms'] / wall * 100:.0f}% ({r['reduction_ms']:.2f})" if r["reduction_ms"] else "–"
            md.append(f"| {r['model']} | {r['wall_ms']:.2f} | " + " | ".join(cells)
                      + f" | {outside / wall * 100:.0f}% ({outside:.2f}) | {reducer} |")
        md.append("")
    return "\n".join(md)


if __name__ == "__main__":
    main()
