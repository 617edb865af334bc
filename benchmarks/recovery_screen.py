"""Distillation recipes for one pruned model, at one budget of images.

The reference is pruned once (``--target``, with reconstruction); a copy of that model is then
distilled from the dense one with each recipe, on the same training images, and evaluated on the
same test images. A recipe is comma-separated ``key=value`` settings over the pruning benchmark's
distillation (lr 2e-4, batch 128, temperature 1, logits only, random crops):

- ``lr``: peak learning rate (cosine to a hundredth of it);
- ``batch``: batch size (the same images in more, smaller steps);
- ``T``: distillation temperature;
- ``alpha``: the teacher's weight (1: logits only; below 1 mixes in the labels' cross-entropy);
- ``augment``: ``crop``, ``crop+flip`` or ``none``.

``--validation N`` splits the test images: recipes are ranked on the first N, and the rest
report what the ranked recipes give on images no choice has seen.

    python benchmarks/recovery_screen.py --model fmnist-vit-197 --target latency=0.5 --kd-images 10000 \\
        --recipes lr=2e-4 lr=1e-3 lr=5e-4,batch=64 alpha=0.5
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, load_reference, write_results  # noqa: E402

import vitrim  # noqa: E402
from vitrim.bench.flops import model_cost  # noqa: E402
from vitrim.data import load_dataset  # noqa: E402
from vitrim.prune import prune  # noqa: E402
from vitrim.prune.recover import distillation_config  # noqa: E402
from vitrim.train import fit  # noqa: E402

BASELINE = {"lr": 2e-4, "batch": 128, "T": 1.0, "alpha": 1.0, "augment": "crop"}
PARSERS = {"lr": float, "batch": int, "T": float, "alpha": float, "augment": str}


def parse_recipe(text: str) -> dict[str, Any]:
    """``lr=1e-3,batch=64`` -> the baseline with those settings replaced."""
    recipe = dict(BASELINE)
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in PARSERS:
            raise argparse.ArgumentTypeError(f"bad recipe item {item!r}; use key=value with key in "
                                             f"{', '.join(PARSERS)}")
        try:
            recipe[key] = PARSERS[key](value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{key} needs a number, got {value!r}") from None
    if recipe["augment"] not in ("crop", "crop+flip", "none"):
        raise argparse.ArgumentTypeError(f"augment must be crop, crop+flip or none, got {recipe['augment']!r}")
    return recipe


def distil(student, teacher, train, recipe: dict[str, Any], images: int):
    cfg = distillation_config(images=images, lr=recipe["lr"], batch_size=recipe["batch"], alpha=recipe["alpha"],
                              temperature=recipe["T"], augment=recipe["augment"].replace("+", ","))
    with tempfile.TemporaryDirectory() as tmp:
        fit(student, train, cfg, tmp, teacher=teacher, progress=False)
    return student.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fmnist-vit-197")
    parser.add_argument("--target", default="latency=0.5")
    parser.add_argument("--recipes", nargs="+", type=parse_recipe, default=[parse_recipe("")])
    parser.add_argument("--kd-images", type=int, default=10000)
    parser.add_argument("--calib", type=int, default=512)
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--validation", type=int, default=0,
                        help="rank the recipes on the first N test images and report the rest apart")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--note", default="")
    parser.add_argument("--name", default="recovery_screen")
    args = parser.parse_args()
    if args.validation < 0:
        parser.error(f"--validation must be 0 or more test images, got {args.validation}")
    dense, test, dense_acc = load_reference(args.model, args.threads, args.eval_limit)
    val, dense_val = None, None
    if args.validation:
        if args.validation >= len(test):
            parser.error(f"--validation must be below {len(test)}, the test images, so that some are left to report")
        val, test = test.take(slice(0, args.validation)), test.take(slice(args.validation, None))
        dense_val, dense_acc = vitrim.evaluate(dense, val)["accuracy"], vitrim.evaluate(dense, test)["accuracy"]
    train = load_dataset("fashion-mnist", "train").resized(dense.config.image_size)
    started = time.perf_counter()
    pruned = prune(dense, args.target, train, recover="reconstruct", calib_images=args.calib, progress=False).model
    cost, dense_cost = model_cost(pruned.config), model_cost(dense.config)
    base = {"accuracy": vitrim.evaluate(pruned, test)["accuracy"], "seconds": time.perf_counter() - started}
    print({"reconstructed": base, "flops_ratio": cost.flops / dense_cost.flops}, flush=True)
    rows: list[dict[str, Any]] = []
    for recipe in args.recipes:
        t0 = time.perf_counter()
        model = distil(copy.deepcopy(pruned), dense, train, recipe, args.kd_images)
        row = {"recipe": recipe, "accuracy": vitrim.evaluate(model, test)["accuracy"],
               "seconds": time.perf_counter() - t0}
        row["drop_points"] = (dense_acc - row["accuracy"]) * 100
        if val is not None:
            row["validation_accuracy"] = vitrim.evaluate(model, val)["accuracy"]
            row["validation_drop_points"] = (dense_val - row["validation_accuracy"]) * 100
        rows.append(row)
        print(row, flush=True)
    result = {"environment": environment(), "model": args.model, "target": args.target,
              "dense_accuracy": dense_acc, "test_images": len(test), "kd_images": args.kd_images,
              "validation_images": args.validation, "dense_validation_accuracy": dense_val,
              "flops_ratio": cost.flops / dense_cost.flops, "params": cost.params, "reconstructed": base,
              "rows": rows}
    lines = [f"# Distillation recipes: {args.model} pruned to {args.target}", "",
             f"Dense accuracy {dense_acc * 100:.2f}% on {len(test)} test images. The pruned model keeps "
             f"{result['flops_ratio']:.3f} of the FLOPs ({cost.params / 1e6:.2f} M params) and "
             f"{base['accuracy'] * 100:.2f}% after reconstruction alone. Each recipe distils a copy of it on the "
             f"first {args.kd_images} training images. Command: `{result['environment']['command']}`",
             *([args.note] if args.note else []), "",
             *([f"Recipes are ranked on the first {args.validation} test images (dense {dense_val * 100:.2f}%); "
                f"the accuracy columns are the other {len(test)} (dense {dense_acc * 100:.2f}%).", ""]
               if val is not None else []),
             "| lr | batch | T | alpha | augment |" + (" validation | validation drop (pt) |" if val is not None else "")
             + " accuracy | drop (pt) | minutes |",
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if val is not None else "")]
    ranked = sorted(rows, key=lambda r: -r["validation_accuracy"]) if val is not None else rows
    for r in ranked:
        c = r["recipe"]
        checked = (f" {r['validation_accuracy'] * 100:.2f}% | {r['validation_drop_points']:.2f} |"
                   if val is not None else "")
        lines.append(f"| {c['lr']:g} | {c['batch']} | {c['T']:g} | {c['alpha']:g} | {c['augment']} |{checked} "
                     f"{r['accuracy'] * 100:.2f}% | {r['drop_points']:.2f} | {r['seconds'] / 60:.1f} |")
    write_results(args.name, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
