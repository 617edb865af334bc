"""ViT-B/16 and DeiT-S shapes at 224x224, built from configs (random weights, no download), in the
Hugging Face and timm families: prune each to 50% FLOPs end to end with a few random calibration
images, check the result is the same family's class and reloads with identical outputs, and time
dense vs pruned with the family's own forward, alternately in one process.

Random weights and random images make this a speed and plumbing check, not an accuracy one.
Each family runs in its own environment; both write into one results file:

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/families_224.py --family hf
    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 .venv-timm/bin/python benchmarks/families_224.py --family timm

``--quick`` runs tiny 32x32 models of the same classes instead (a smoke test, seconds) and
writes families_224_quick.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, write_results  # noqa: E402

import vitrim  # noqa: E402
from vitrim.adapters import to_canonical  # noqa: E402
from vitrim.adapters.native import NativeModel  # noqa: E402
from vitrim.adapters.random_data import pseudo_labelled  # noqa: E402
from vitrim.bench.flops import model_cost  # noqa: E402
from vitrim.bench.latency import paired_latency  # noqa: E402

# shape -> (width, heads, MLP width, timm name); depth 12, patch 16, 224x224, 1000 classes
SHAPES = {"vit-b16": (768, 12, 3072, "vit_base_patch16_224"), "deit-s": (384, 6, 1536, "deit_small_patch16_224")}
QUICK = dict(image=32, patch=8, width=64, heads=4, mlp=128, depth=4, classes=10)


def build(family: str, shape: str, quick: bool) -> torch.nn.Module:
    """The family's model at ``shape`` (or the tiny quick version of the same class), random weights."""
    width, heads, mlp, timm_name = SHAPES[shape]
    torch.manual_seed(0)
    if family == "timm":
        if not quick:
            return vitrim.load(f"timm:{timm_name}")
        import timm

        q = QUICK
        return timm.create_model(timm_name, pretrained=False, img_size=q["image"], patch_size=q["patch"],
                                 embed_dim=q["width"], num_heads=q["heads"], mlp_ratio=q["mlp"] / q["width"],
                                 depth=q["depth"], num_classes=q["classes"]).eval()
    import transformers

    sizes = dict(hidden_size=width, num_attention_heads=heads, intermediate_size=mlp, num_labels=1000)
    if quick:
        q = QUICK
        sizes = dict(image_size=q["image"], patch_size=q["patch"], hidden_size=q["width"],
                     num_attention_heads=q["heads"], intermediate_size=q["mlp"], num_hidden_layers=q["depth"],
                     num_labels=q["classes"])
    if shape.startswith("deit"):
        return transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**sizes)).eval()
    return transformers.ViTForImageClassification(transformers.ViTConfig(**sizes)).eval()


def run_shape(family: str, shape: str, args: argparse.Namespace) -> dict[str, Any]:
    model = build(family, shape, args.quick)
    dense = to_canonical(model)
    data = pseudo_labelled(dense, args.calib)
    started = time.perf_counter()
    result = vitrim.prune(model, "flops=0.5", data, recover="reconstruct", calib_images=args.calib,
                          batch_size=8, steps=args.steps, progress=False)
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        vitrim.save(result.model, tmp)
        reloaded = vitrim.load(tmp)
    x = next(data.batches(2))[0]
    with torch.no_grad():
        identical = torch.equal(NativeModel(reloaded)(x), NativeModel(result.model)(x))
    pruned = to_canonical(reloaded)
    row = {"family": family, "shape": shape, "class": type(model).__name__,
           "same_class_after_reload": type(reloaded) is type(model), "reload_identical": identical,
           "kept_flops": result.kept_ratio, "flops_dense": model_cost(dense.config).flops,
           "flops_pruned": model_cost(pruned.config).flops, "params_dense": model_cost(dense.config).params,
           "params_pruned": model_cost(pruned.config).params, "embed_dim": pruned.config.embed_dim,
           "prune_seconds": seconds}
    for batch in args.batch:
        lat = paired_latency(NativeModel(model), NativeModel(reloaded), batch, threads=args.threads, runs=args.runs)
        row[f"latency_ms_dense_b{batch}"], row[f"latency_ms_pruned_b{batch}"] = lat["first_ms"], lat["second_ms"]
        row[f"speedup_b{batch}"] = lat["speedup"]
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict[str, Any]], runs: dict[str, Any], quick: bool) -> str:
    batches = sorted({int(k.removeprefix("speedup_b")) for r in rows for k in r if k.startswith("speedup_b")})
    title = "tiny 32x32 stand-ins (--quick smoke test)" if quick else "224x224 ViT-B/16 and DeiT-S shapes"
    lines = [f"# Model families: {title}, pruned to 50% FLOPs", "",
             "Random weights and random calibration images pseudo-labelled by the dense model (a speed check, "
             "not an accuracy one); Fisher saliency, least-squares reconstruction, heads pruned whole. "
             "Latency: the family's own forward, dense vs pruned (reloaded from disk), timed alternately in "
             "one process; ideal speedup = 1 / FLOPs kept.", ""]
    for family, info in sorted(runs.items()):
        env = info["environment"]
        lines.append(f"- {family}: torch {env['torch']}, {env['threads']} threads, {env['device']}; "
                     f"`{env['command']}`")
    lines += ["", "| family | shape | class | FLOPs kept | params | width | reload: class / outputs | prune s | "
              + " | ".join(f"b={b} ms dense -> pruned (speedup)" for b in batches) + " |",
              "|" + "---|" * (8 + len(batches))]
    for r in rows:
        lat = [f"{r[f'latency_ms_dense_b{b}']:.1f} -> {r[f'latency_ms_pruned_b{b}']:.1f} ({r[f'speedup_b{b}']:.2f}x)"
               if f"speedup_b{b}" in r else "-" for b in batches]
        lines.append(f"| {r['family']} | {r['shape']} | {r['class']} | {r['kept_flops']:.3f} (ideal "
                     f"{1 / r['kept_flops']:.2f}x) | {r['params_pruned'] / 1e6:.2f} M of {r['params_dense'] / 1e6:.2f} M "
                     f"| {r['embed_dim']} | {r['same_class_after_reload']} / {r['reload_identical']} | "
                     f"{r['prune_seconds']:.0f} | " + " | ".join(lat) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["hf", "timm"], required=True)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--calib", type=int, default=16, help="random calibration images")
    parser.add_argument("--steps", type=int, default=3, help="pruning steps")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="latency batch sizes")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per model and batch size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny 32x32 models of the same classes (smoke test)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [run_shape(args.family, shape, args) for shape in args.shapes]
    name = "families_224_quick" if args.quick else "families_224"
    previous = RESULTS / f"{name}.json"
    merged = json.loads(previous.read_text()) if previous.is_file() else {"runs": {}, "rows": []}
    merged["runs"][args.family] = {"environment": environment(), "settings": {
        k: getattr(args, k) for k in ("shapes", "calib", "steps", "batch", "runs", "threads")}}
    merged["rows"] = [r for r in merged["rows"] if r["family"] != args.family] + rows  # the other family's stay
    write_results(name, merged, markdown(merged["rows"], merged["runs"], args.quick))


if __name__ == "__main__":
    main()
