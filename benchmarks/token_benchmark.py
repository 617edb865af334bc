"""Token reduction: accuracy against measured speed-up, per method and knob value.

Each method's knob is swept on the bundled model; accuracy on the Fashion-MNIST test set,
FLOPs from the token counts each block saw, latency against the dense model in this process
(alternating runs, median, fixed threads) at batch 1 and 64. Writes JSON, markdown and a plot.

    python benchmarks/token_benchmark.py --layers 1,3 --runs 40
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

SWEEPS = {
    ("drop", "static"): ("keep", [1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2]),
    ("evit", "static"): ("keep", [1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2]),
    ("tome", "static"): ("keep", [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]),
    ("drop", "dynamic"): ("tau", [0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5]),
    ("evit", "dynamic"): ("tau", [0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5]),
}


def plot(rows: list[dict[str, Any]], dense_acc: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, batch in zip(axes, (1, 64)):
        for key in sorted({(r["method"], r["mode"]) for r in rows}):
            pts = [r for r in rows if (r["method"], r["mode"]) == key]
            ax.plot([r[f"speedup_b{batch}"] for r in pts], [r["accuracy"] * 100 for r in pts], "o-",
                    label=f"{key[0]} ({key[1]})", markersize=4)
        ax.axhline(dense_acc * 100, color="gray", linestyle="--", linewidth=1, label="dense")
        ax.axvline(1.0, color="gray", linewidth=0.5)
        ax.set_xlabel(f"measured speed-up vs dense, batch {batch}")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fmnist-vit")
    parser.add_argument("--layers", type=lambda t: [int(v) for v in t.split(",")], default=[1, 3])
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="token_benchmark")
    args = parser.parse_args()
    dense, test, dense_acc = load_reference(args.model, args.threads, args.eval_limit)
    dense_flops = model_cost(dense.config).flops
    sample = next(test.batches(256))[0]
    rows = []
    for (method, mode), (knob, values) in SWEEPS.items():
        reduced = reduce_tokens(dense, method, layers=args.layers, mode=mode)
        for value in values:
            setattr(reduced, knob, value)
            row = {"method": method, "mode": mode, "knob": knob, "value": value,
                   "accuracy": vitrim.evaluate(reduced, test)["accuracy"],
                   "flops_ratio": reduced_flops(reduced, sample) / dense_flops}
            row["drop_points"] = (dense_acc - row["accuracy"]) * 100
            for batch in (1, 64):
                row[f"speedup_b{batch}"] = paired_latency(dense, reduced, batch, threads=args.threads,
                                                          runs=args.runs)["speedup"]
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(rows, dense_acc, RESULTS / f"{args.name}.png")
    result = {"environment": environment(), "model": args.model, "layers": args.layers, "dense_accuracy": dense_acc,
              "rows": rows}
    lines = [f"# Token reduction: {args.model}", "",
             f"Dense accuracy {dense_acc * 100:.2f}%; reduction after blocks {args.layers}. "
             f"Command: `{result['environment']['command']}`", "", f"![accuracy vs speed-up]({args.name}.png)", "",
             "| method | mode | knob | accuracy | drop (pt) | FLOPs kept | speedup b=1 | speedup b=64 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['mode']} | {r['knob']}={r['value']:g} | {r['accuracy'] * 100:.2f}% | "
                     f"{r['drop_points']:.2f} | {r['flops_ratio']:.3f} | {r['speedup_b1']:.2f}x | {r['speedup_b64']:.2f}x |")
    write_results(args.name, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
