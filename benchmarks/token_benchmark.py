"""Token reduction: accuracy against FLOPs and measured speed-up, per method and knob value.

Training-free methods (attention-guided dropping, EViT fusion, ToMe-style merging; static and
per-image dynamic) are swept on the bundled model; incremental-resolution models (``--iret``
directories, e.g. trained with ``vitrim train --arch iret``) sweep their own knob. Accuracy on
the Fashion-MNIST test set, FLOPs from the token counts each block saw, latency against the
dense model in this process (alternating runs, median, fixed threads) at batch 1 and 64.
Writes JSON, markdown and a plot.

    python benchmarks/token_benchmark.py --iret runs/iret-learned runs/iret-haar --threads 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, load_reference, write_results  # noqa: E402

import vitrim  # noqa: E402
from vitrim.bench.flops import model_cost  # noqa: E402
from vitrim.bench.latency import paired_latency  # noqa: E402
from vitrim.tokens import reduce_tokens, reduced_flops  # noqa: E402
from vitrim.tokens.model import default_layers  # noqa: E402

KEEPS = [0.8, 0.6, 0.4, 0.25]
TAUS = [0.95, 0.9, 0.8, 0.6]
TRAINING_FREE = {
    ("drop", "static"): ("keep", KEEPS),
    ("evit", "static"): ("keep", KEEPS),
    ("tome", "static"): ("keep", [0.8, 0.6, 0.5]),
    ("drop", "dynamic"): ("tau", TAUS),
    ("evit", "dynamic"): ("tau", TAUS),
}
IRET = {"static": ("keep", [1.0, 0.8, 0.6, 0.4, 0.25, 0.1, 0.05]), "dynamic": ("tau", [0.95, 0.9, 0.8, 0.6, 0.4])}


def plot(rows: list[dict[str, Any]], dense_acc: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    axis_keys = [("flops_reduction", "FLOPs reduction vs dense (x)")] + [
        (f"speedup_b{b}", f"measured speed-up vs dense, batch {b}") for b in (1, 64)]
    for ax, (key, label) in zip(axes, axis_keys):
        for name in dict.fromkeys(r["label"] for r in rows):
            pts = [r for r in rows if r["label"] == name and r.get(key) is not None]
            if pts:
                ax.plot([r[key] for r in pts], [r["accuracy"] * 100 for r in pts], "o-", label=name, markersize=4)
        ax.axhline(dense_acc * 100, color="gray", linestyle="--", linewidth=1, label="dense")
        ax.axhline(dense_acc * 100 - 0.5, color="gray", linestyle=":", linewidth=1, label="dense - 0.5 pt")
        ax.axvline(1.0, color="gray", linewidth=0.5)
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_ylim(max(50.0, min(r["accuracy"] * 100 for r in rows) - 1), dense_acc * 100 + 1.5)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweeps(dense, iret_dirs: list[str], layers: list[int], training_free: bool = True):
    """(label, model, knob, values) for every curve."""
    for (method, mode), (knob, values) in TRAINING_FREE.items() if training_free else ():
        yield f"{method} ({mode}, no training)", reduce_tokens(dense, method, layers=layers, mode=mode), knob, values
    for directory in iret_dirs:
        model = vitrim.load(directory)
        lifting = "learned lifting" if model.options.learnable else "Haar"
        for mode, (knob, values) in IRET.items():
            model = vitrim.load(directory)
            model.mode = mode
            yield f"iret {lifting} ({mode})", model, knob, values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fmnist-vit")
    parser.add_argument("--iret", nargs="*", default=[], help="incremental-resolution model directories")
    parser.add_argument("--layers", type=lambda t: [int(v) for v in t.split(",")], default=None,
                        help="blocks after which training-free methods reduce (default: vitrim's default layers)")
    parser.add_argument("--iret-only", action="store_true", help="sweep only the --iret models")
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--runs", type=int, default=40, help="timed runs per model at batch 1 (batch 64: half)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="token_benchmark")
    args = parser.parse_args()
    dense, test, dense_acc = load_reference(args.model, args.threads, args.eval_limit)
    args.layers = list(args.layers or default_layers(dense.config.depth))
    dense_flops = model_cost(dense.config).flops
    sample = next(test.batches(256))[0]
    rows = []
    for label, model, knob, values in sweeps(dense, args.iret, args.layers, not args.iret_only):
        for value in values:
            setattr(model, knob, value)
            row = {"label": label, "knob": knob, "value": value,
                   "accuracy": vitrim.evaluate(model, test)["accuracy"],
                   "flops_ratio": reduced_flops(model, sample) / dense_flops}
            row["flops_reduction"] = 1 / row["flops_ratio"]
            row["drop_points"] = (dense_acc - row["accuracy"]) * 100
            for batch, runs in ((1, args.runs), (64, max(10, args.runs // 2))):
                row[f"speedup_b{batch}"] = paired_latency(dense, model, batch, threads=args.threads,
                                                          runs=runs)["speedup"]
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(rows, dense_acc, RESULTS / f"{args.name}.png")
    result = {"environment": environment(), "model": args.model, "layers": args.layers, "iret": args.iret,
              "dense_accuracy": dense_acc, "eval_images": len(test), "rows": rows}
    lines = [f"# Token reduction: {args.model}", "",
             f"Dense accuracy {dense_acc * 100:.2f}% on {len(test)} test images. "
             + ("" if args.iret_only else f"Training-free methods reduce after blocks {args.layers}; ")
             + f"incremental-resolution models: {', '.join(args.iret) or 'none'}. "
             f"Command: `{result['environment']['command']}`", "", f"![accuracy vs compute]({args.name}.png)", "",
             "| method | knob | accuracy | drop (pt) | FLOPs kept | speed-up b=1 | speed-up b=64 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['knob']}={r['value']:g} | {r['accuracy'] * 100:.2f}% | "
                     f"{r['drop_points']:.2f} | {r['flops_ratio']:.3f} | {r['speedup_b1']:.2f}x | {r['speedup_b64']:.2f}x |")
    write_results(args.name, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
