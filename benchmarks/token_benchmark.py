"""Token reduction: accuracy against FLOPs and measured speed-up, per method and knob value.

Training-free methods (attention-guided dropping, EViT fusion, ToMe-style merging; static and
per-image dynamic) are swept on the bundled model at vitrim's default layers, and merging also
after every block but the last (``--merge-layers``); models fine-tuned for a reduction
(``--tuned`` directories, ``vitrim train --arch tokens``) sweep their reduction in both modes;
incremental-resolution models (``--iret`` directories, ``vitrim train --arch iret``) sweep their
own knob. Accuracy on the Fashion-MNIST test set, always measured against the bundled dense
model; FLOPs from the token counts each block saw; latency against the dense model in this
process (alternating runs, median, fixed threads) at batch 1 and 64. Writes JSON, markdown (with
the aims: best speed-up within 0.5 points, dynamic against static at equal FLOPs) and a plot.

    python benchmarks/token_benchmark.py --tuned runs/tome-tuned --iret runs/iret --threads 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, load_reference, speedup_cell, write_results  # noqa: E402

import vitrim  # noqa: E402
from vitrim.bench.flops import model_cost  # noqa: E402
from vitrim.bench.latency import paired_latency  # noqa: E402
from vitrim.cli import parse_ints  # noqa: E402
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
    ("tome", "dynamic"): ("tau", [0.9, 0.7, 0.5]),  # cosine similarity above which tokens merge
}
MERGE_EVERYWHERE = {"static": ("keep", [0.9, 0.85, 0.8, 0.75, 0.7]), "dynamic": ("tau", [0.9, 0.85, 0.8, 0.75, 0.7])}
# fine-tuned for a keep range (``--train-keep``, default 0.5-1): swept down to its bottom
TUNED = {"static": ("keep", [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]), "dynamic": ("tau", [0.9, 0.85, 0.8, 0.75, 0.7])}
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


def sweeps(dense, iret_dirs: list[str], tuned_dirs: list[str], layers: list[int], merge_layers: list[int],
           training_free: bool = True):
    """(label, model, knob, values) for every curve."""
    for (method, mode), (knob, values) in TRAINING_FREE.items() if training_free else ():
        yield f"{method} ({mode}, no training)", reduce_tokens(dense, method, layers=layers, mode=mode), knob, values
    for mode, (knob, values) in MERGE_EVERYWHERE.items() if training_free and merge_layers else ():
        yield f"tome every block ({mode}, no training)", reduce_tokens(dense, "tome", layers=merge_layers,
                                                                       mode=mode), knob, values
    for directory in tuned_dirs:
        tuned = vitrim.load(directory)
        for mode, (knob, values) in TUNED.items():
            model = reduce_tokens(tuned, mode=mode)
            yield f"{model.method} fine-tuned, {Path(directory).name} ({mode})", model, knob, values
    for directory in iret_dirs:
        model = vitrim.load(directory)
        lifting = "learned lifting" if model.options.learnable else "Haar"
        mixer = ", detail mixer" if model.options.detail_mixer else ""
        for mode, (knob, values) in IRET.items():
            model = vitrim.load(directory)
            model.mode = mode
            yield f"iret {lifting}{mixer}, {Path(directory).name} ({mode})", model, knob, values


def training_commands(directories: list[str]) -> list[str]:
    """Markdown lines: how each fine-tuned model was trained (from its saved config)."""
    from vitrim.io import CONFIG_FILE, read_json_file

    lines = []
    for directory in directories:
        command = read_json_file(Path(directory) / CONFIG_FILE, "", "").get("training", {}).get("command")
        lines.append(f"- `{directory}` was trained here with `{command or 'unknown'}` (not committed).")
    return lines + [""] if lines else []


def static_accuracy_at(rows: list[dict[str, Any]], flops: float) -> float | None:
    """Static curve's accuracy interpolated at ``flops`` (None outside its range)."""
    pts = sorted((r["flops_ratio"], r["accuracy"]) for r in rows)
    for (f0, a0), (f1, a1) in zip(pts, pts[1:]):
        if f0 <= flops <= f1:
            return a0 + (a1 - a0) * (flops - f0) / max(f1 - f0, 1e-12)
    return None


def aims(rows: list[dict[str, Any]], dense_acc: float) -> list[str]:
    """Markdown lines: best speed-up within 0.5 points; dynamic against static at equal FLOPs."""
    lines = ["## Aims", ""]
    close = [r for r in rows if r["drop_points"] <= 0.5 and r["flops_ratio"] < 0.999]
    for batch in (1, 64):
        if close:
            best = max(close, key=lambda r: r[f"speedup_b{batch}"])
            lines.append(f"- Best measured speed-up at batch {batch} within 0.5 points of dense: "
                         f"{best[f'speedup_b{batch}']:.2f}x — {best['label']}, {best['knob']}={best['value']:g} "
                         f"({best['accuracy'] * 100:.2f}%, FLOPs {best['flops_ratio']:.3f}); aim 2x.")
    for label in dict.fromkeys(r["label"] for r in rows if "(dynamic" in r["label"]):
        static = [r for r in rows if r["label"] == label.replace("(dynamic", "(static")]
        compared = []
        for r in (r for r in rows if r["label"] == label and r["flops_ratio"] < 0.999):
            at = static_accuracy_at(static, r["flops_ratio"])
            if at is not None:
                compared.append(f"{r['knob']}={r['value']:g} {(r['accuracy'] - at) * 100:+.2f}")
        if compared:
            lines.append(f"- {label} minus static at equal FLOPs (points, interpolated): {', '.join(compared)}.")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fmnist-vit")
    parser.add_argument("--iret", nargs="*", default=[], help="incremental-resolution model directories")
    parser.add_argument("--layers", type=parse_ints, default=None,
                        help="blocks after which training-free methods reduce (default: vitrim's default layers)")
    parser.add_argument("--merge-layers", type=parse_ints, default=None,
                        help="blocks after which the 'tome every block' curves merge (default: all but the last)")
    parser.add_argument("--tuned", nargs="*", default=[], help="directories of models fine-tuned for a reduction")
    parser.add_argument("--iret-only", action="store_true",
                        help="sweep only the --iret and --tuned models, not the training-free methods")
    parser.add_argument("--curves", nargs="*", default=None,
                        help="sweep only the curves whose label contains one of these words (e.g. static)")
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--runs", type=int, default=40, help="timed runs per model at batch 1 (batch 64: half)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="token_benchmark")
    args = parser.parse_args()
    dense, test, dense_acc = load_reference(args.model, args.threads, args.eval_limit)
    args.layers = list(args.layers or default_layers(dense.config.depth))
    args.merge_layers = list(args.merge_layers or range(dense.config.depth - 1))
    dense_flops = model_cost(dense.config).flops
    sample = next(test.batches(256))[0]
    rows = []
    for label, model, knob, values in sweeps(dense, args.iret, args.tuned, args.layers, args.merge_layers,
                                             not args.iret_only):
        if args.curves and not any(word in label for word in args.curves):
            continue
        for value in values:
            setattr(model, knob, value)
            row = {"label": label, "knob": knob, "value": value,
                   "accuracy": vitrim.evaluate(model, test)["accuracy"],
                   "flops_ratio": reduced_flops(model, sample) / dense_flops}
            row["flops_reduction"] = 1 / row["flops_ratio"]
            row["drop_points"] = (dense_acc - row["accuracy"]) * 100
            for batch, runs in ((1, args.runs), (64, max(10, args.runs // 2))):
                timing = paired_latency(dense, model, batch, threads=args.threads, runs=runs)
                row[f"speedup_b{batch}"] = timing["speedup"]
                row[f"timing_b{batch}"] = timing  # both medians, each one's p90/p10 spread, stable
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(rows, dense_acc, RESULTS / f"{args.name}.png")
    result = {"environment": environment(), "model": args.model, "layers": args.layers,
              "merge_layers": args.merge_layers, "tuned": args.tuned, "iret": args.iret,
              "dense_accuracy": dense_acc, "eval_images": len(test), "rows": rows}
    lines = [f"# Token reduction: {args.model}", "",
             f"Dense accuracy {dense_acc * 100:.2f}% on {len(test)} test images. "
             + ("" if args.iret_only else f"Training-free methods reduce after blocks {args.layers}, 'every block' "
                f"after {args.merge_layers}; ")
             + f"fine-tuned models: {', '.join(args.tuned) or 'none'}; "
             + f"incremental-resolution models: {', '.join(args.iret) or 'none'}. "
             f"Command: `{result['environment']['command']}`", "", f"![accuracy vs compute]({args.name}.png)", "",
             *training_commands(args.tuned + args.iret), *aims(rows, dense_acc),
             "Speed-ups: timed alternately with dense, median of the runs; in brackets each one's p90/p10 "
             "spread (dense / reduced); `*`: over the stability limit.", "",
             "| method | knob | accuracy | drop (pt) | FLOPs kept | speed-up b=1 | speed-up b=64 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['knob']}={r['value']:g} | {r['accuracy'] * 100:.2f}% | "
                     f"{r['drop_points']:.2f} | {r['flops_ratio']:.3f} | {speedup_cell(r, 1)} | {speedup_cell(r, 64)} |")
    write_results(args.name, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
