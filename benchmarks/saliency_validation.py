"""Does the saliency predict the real loss increase? Per structure kind, Spearman correlation
between each method's score and the loss increase measured by removing the structure alone.

    python benchmarks/saliency_validation.py --model fmnist-vit --calib 512 --per-kind 48
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, spearman, write_results  # noqa: E402

import vitrim  # noqa: E402
from vitrim.data import load_dataset  # noqa: E402
from vitrim.prune.api import calibration_batches  # noqa: E402
from vitrim.prune.gates import gate_shapes, gated, kind_of  # noqa: E402
from vitrim.prune.saliency import accumulate_gradients, magnitude_saliency  # noqa: E402


@torch.no_grad()
def mean_loss(model, batches, gates=None) -> float:
    total, count = 0.0, 0
    with gated(model, gates or {}):
        for x, y in batches:
            total += F.cross_entropy(model(x), y, reduction="sum").item()
            count += y.numel()
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fmnist-vit")
    parser.add_argument("--calib", type=int, default=512)
    parser.add_argument("--per-kind", type=int, default=48, help="structures sampled per kind")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = vitrim.load(args.model)
    data = load_dataset("fashion-mnist", "train")
    batches = calibration_batches(data, args.calib, 128, model.config.image_size, args.seed)
    started = time.perf_counter()
    gradients = accumulate_gradients(model, batches)
    scores = {m: gradients.scores(m) for m in ("fisher", "taylor", "taylor2")}
    scores["magnitude"] = magnitude_saliency(model)
    base = mean_loss(model, batches)
    shapes = gate_shapes(model.config)
    rng = random.Random(args.seed)
    by_kind: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for key, shape in shapes.items():
        for index in (torch.cartesian_prod(*[torch.arange(s) for s in shape]).view(-1, len(shape)).tolist()
                      if shape else [[]]):
            by_kind.setdefault(kind_of(key), []).append((key, tuple(index)))
    rows = {}
    for kind, items in sorted(by_kind.items()):
        sample = rng.sample(items, min(args.per_kind, len(items)))
        true = []
        for key, index in sample:
            gate = torch.ones(shapes[key])
            gate[index] = 0.0
            true.append(mean_loss(model, batches, {key: gate}) - base)
        rows[kind] = {"count": len(sample), "mean_true_increase": sum(true) / len(true)}
        for method, s in scores.items():
            est = [float(s[key][index]) for key, index in sample]
            rows[kind][method] = spearman(est, true)
        print(kind, rows[kind], flush=True)
    result = {"environment": environment(), "model": args.model, "calib": args.calib, "base_loss": base,
              "seconds": time.perf_counter() - started, "spearman": rows}
    lines = ["# Saliency vs true loss increase (Spearman rank correlation)", "",
             f"Model `{args.model}`, {args.calib} calibration images, up to {args.per_kind} structures per kind, "
             f"each removed alone. Command: `{result['environment']['command']}`", "",
             "| kind | structures | fisher | taylor | taylor2 | magnitude | mean true increase |",
             "|---|---|---|---|---|---|---|"]
    for kind, r in rows.items():
        lines.append(f"| {kind} | {r['count']} | {r['fisher']:.3f} | {r['taylor']:.3f} | {r['taylor2']:.3f} | {r['magnitude']:.3f} | "
                     f"{r['mean_true_increase']:.2e} |")
    write_results("saliency_validation", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
