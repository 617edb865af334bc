"""Backbones users compress in 2026 — DINOv2, CLIP and SigLIP vision towers — at 224x224, built
from configs (random weights, no download): prune each to 50% FLOPs without labels (the distance
to the dense model's own output features), check the result is the same class and reloads with
identical outputs, and time dense vs pruned with the family's own forward, interleaved in one
process.

Random weights and images make this a speed and plumbing check, not an accuracy one:

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/backbones_224.py

``--quick`` runs tiny 32x32 models of the same classes instead (a smoke test, seconds).
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
from common import environment, write_results  # noqa: E402

import vitrim  # noqa: E402
from vitrim.adapters import to_canonical  # noqa: E402
from vitrim.adapters.native import NativeModel  # noqa: E402
from vitrim.bench.flops import model_cost  # noqa: E402
from vitrim.bench.latency import interleaved_latency, unstable_warning  # noqa: E402
from vitrim.data.dataset import ImageSet  # noqa: E402

# name -> (transformers class, config class, config sizes at 224x224)
SHAPES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "dinov2-s14": ("Dinov2Model", "Dinov2Config",
                   dict(hidden_size=384, num_attention_heads=6, num_hidden_layers=12, mlp_ratio=4, patch_size=14)),
    "clip-b16": ("CLIPVisionModelWithProjection", "CLIPVisionConfig",
                 dict(hidden_size=768, num_attention_heads=12, num_hidden_layers=12, intermediate_size=3072,
                      patch_size=16, projection_dim=512)),
    "siglip-b16": ("SiglipVisionModel", "SiglipVisionConfig",
                   dict(hidden_size=768, num_attention_heads=12, num_hidden_layers=12, intermediate_size=3072,
                        patch_size=16)),
}
QUICK = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=4, patch_size=8)


def build(shape: str, quick: bool) -> torch.nn.Module:
    """The family's model at ``shape`` (or a tiny version of the same class), random weights."""
    import transformers

    hf_class, config_class, sizes = SHAPES[shape]
    sizes = dict(sizes, image_size=224)
    if quick:
        sizes.update(QUICK, image_size=32)
        if "intermediate_size" in sizes:
            sizes["intermediate_size"] = 128
        if "mlp_ratio" in sizes:
            sizes["mlp_ratio"] = 2
    torch.manual_seed(0)
    return getattr(transformers, hf_class)(getattr(transformers, config_class)(**sizes)).eval()


def unlabelled(model: torch.nn.Module, count: int) -> ImageSet:
    cfg = to_canonical(model).config
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, cfg.in_chans, cfg.image_size, cfg.image_size), dtype=torch.uint8,
                           generator=generator)
    return ImageSet(images=images, labels=None, class_names=[], mean=cfg.mean, std=cfg.std, name="random images")


def run_shape(shape: str, args: argparse.Namespace) -> dict[str, Any]:
    model = build(shape, args.quick)
    dense = to_canonical(model)
    data = unlabelled(model, args.calib)
    started = time.perf_counter()
    result = vitrim.prune(model, "flops=0.5", data, recover="reconstruct", calib_images=args.calib, batch_size=8,
                          steps=args.steps, progress=False)
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        vitrim.save(result.model, tmp)
        reloaded = vitrim.load(tmp)
    x = torch.randn(2, dense.config.in_chans, dense.config.image_size, dense.config.image_size)
    with torch.no_grad():
        identical = torch.equal(NativeModel(reloaded)(x), NativeModel(result.model)(x))
    pruned = to_canonical(reloaded)
    row = {"shape": shape, "class": type(model).__name__, "same_class_after_reload": type(reloaded) is type(model),
           "reload_identical": identical, "objective": result.config.objective,
           "kept_flops": model_cost(pruned.config).flops / model_cost(dense.config).flops,
           "flops_dense": model_cost(dense.config).flops, "flops_pruned": model_cost(pruned.config).flops,
           "params_dense": model_cost(dense.config).params, "params_pruned": model_cost(pruned.config).params,
           "embed_dim": pruned.config.embed_dim, "prune_seconds": seconds}
    timing = interleaved_latency({"dense": NativeModel(model), "pruned": NativeModel(reloaded)}, args.batch,
                                 threads=args.threads, runs=args.runs)
    row["latency"] = timing
    for batch in args.batch:
        row[f"speedup_b{batch}"] = timing["pruned"][batch]["speedup"]
    print(json.dumps({k: v for k, v in row.items() if k != "latency"}), flush=True)
    return row


def markdown(rows: list[dict[str, Any]], env: dict[str, Any], quick: bool) -> str:
    title = "tiny 32x32 stand-ins (--quick smoke test)" if quick else "224x224 DINOv2-S/14, CLIP-B/16, SigLIP-B/16"
    lines = [f"# Backbones: {title}, pruned to 50% FLOPs without labels", "",
             "Random weights, random unlabelled calibration images; the objective is the distance to the dense "
             "model's output features; Fisher saliency, least-squares reconstruction, heads pruned whole, the "
             "output width kept. Latency: the family's own forward, dense vs pruned (reloaded from disk), "
             "interleaved in one process (median of the runs; p10-p90 in brackets); ideal speed-up = 1 / FLOPs kept.",
             "", f"torch {env['torch']}, {env['threads']} threads, {env['device']}; `{env['command']}`", "",
             "| shape | class | FLOPs kept (ideal) | params | reload: class / outputs | prune s | latency |",
             "|---|---|---|---|---|---|---|"]
    figures = []
    for r in rows:
        cells = []
        for batch, stats in r["latency"]["pruned"].items():
            d = r["latency"]["dense"][batch]
            figures += [(f"{r['shape']} dense", batch, d), (f"{r['shape']} pruned", batch, stats)]
            cells.append(f"b={batch}: {d['median_ms']:.1f} [{d['p10_ms']:.1f}-{d['p90_ms']:.1f}] -> "
                         f"{stats['median_ms']:.1f} [{stats['p10_ms']:.1f}-{stats['p90_ms']:.1f}] ms, "
                         f"**{stats['speedup']:.2f}x**")
        lines.append(f"| {r['shape']} | {r['class']} | {r['kept_flops']:.3f} ({1 / r['kept_flops']:.2f}x) | "
                     f"{r['params_pruned'] / 1e6:.2f} M of {r['params_dense'] / 1e6:.2f} M | "
                     f"{r['same_class_after_reload']} / {r['reload_identical']} | {r['prune_seconds']:.0f} | "
                     + "; ".join(cells) + " |")
    warning = unstable_warning(figures)
    return "\n".join(lines + ([""] + [warning] if warning else [])) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--calib", type=int, default=32, help="random calibration images")
    parser.add_argument("--steps", type=int, default=3, help="pruning steps")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="latency batch sizes")
    parser.add_argument("--runs", type=int, default=30, help="timed rounds per batch size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny 32x32 models of the same classes (smoke test)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [run_shape(shape, args) for shape in args.shapes]
    name = "backbones_224_quick" if args.quick else "backbones_224"
    env = environment()
    write_results(name, {"environment": env, "settings": vars(args), "rows": rows}, markdown(rows, env, args.quick))


if __name__ == "__main__":
    main()
