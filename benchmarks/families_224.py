"""ViT-B/16 and DeiT-S shapes at 224x224, built from configs (random weights), in the Hugging
Face and timm families: prune to 50% FLOPs end to end with a few calibration images, check the
result is the same family's class, reloads, and measure dense vs pruned latency in one process.

    python benchmarks/families_224.py --family hf          # in the main environment
    .venv-timm/bin/python benchmarks/families_224.py --family timm
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results  # noqa: E402

import vitrim  # noqa: E402
from vitrim.adapters import to_canonical  # noqa: E402
from vitrim.bench.flops import model_cost  # noqa: E402
from vitrim.bench.latency import paired_latency  # noqa: E402
from vitrim.data.dataset import ImageSet  # noqa: E402

SHAPES = {"vit-b16": dict(hidden=768, heads=12, mlp=3072), "deit-s": dict(hidden=384, heads=6, mlp=1536)}


def build(family: str, shape: str) -> torch.nn.Module:
    s = SHAPES[shape]
    torch.manual_seed(0)
    if family == "hf":
        import transformers

        if shape.startswith("deit"):
            cfg = transformers.DeiTConfig(hidden_size=s["hidden"], num_attention_heads=s["heads"],
                                          intermediate_size=s["mlp"], num_labels=1000)
            return transformers.DeiTForImageClassificationWithTeacher(cfg).eval()
        cfg = transformers.ViTConfig(hidden_size=s["hidden"], num_attention_heads=s["heads"],
                                     intermediate_size=s["mlp"], num_labels=1000)
        return transformers.ViTForImageClassification(cfg).eval()
    import timm

    return timm.create_model("deit_small_patch16_224" if shape.startswith("deit") else "vit_base_patch16_224",
                             pretrained=False).eval()


def pseudo_labelled(model: torch.nn.Module, count: int) -> ImageSet:
    """Random images labelled by the model itself (random weights have no true labels)."""
    canonical = to_canonical(model)
    cfg = canonical.config
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, cfg.image_size, cfg.image_size), generator=g, dtype=torch.uint8)
    data = ImageSet(images, torch.zeros(count, dtype=torch.long), [str(i) for i in range(cfg.num_classes)],
                    cfg.mean, cfg.std)
    with torch.no_grad():
        labels = canonical(next(data.batches(count))[0]).argmax(-1)
    return ImageSet(images, labels, data.class_names, cfg.mean, cfg.std)


class LogitsOf(torch.nn.Module):
    """The family's model called on pixels, returning the logits tensor (HF returns an output object)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = to_canonical(model).config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out.logits if hasattr(out, "logits") else out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["hf", "timm"], required=True)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--calib", type=int, default=16)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for shape in args.shapes:
        model = build(args.family, shape)
        data = pseudo_labelled(model, args.calib)
        started = time.perf_counter()
        result = vitrim.prune(model, "flops=0.5", data, recover="reconstruct", calib_images=args.calib,
                              batch_size=8, steps=1, progress=False)
        seconds = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as tmp:
            vitrim.save(result.model, tmp)
            reloaded = vitrim.load(tmp)
        dense, pruned = to_canonical(model), to_canonical(reloaded)
        row = {"family": args.family, "shape": shape, "class": type(result.model).__name__,
               "same_class_after_reload": type(reloaded) is type(model), "kept_flops": result.kept_ratio,
               "params_dense": model_cost(dense.config).params, "params_pruned": model_cost(pruned.config).params,
               "prune_seconds": seconds}
        for batch in (1, 8):
            lat = paired_latency(LogitsOf(model), LogitsOf(reloaded), batch, threads=args.threads,
                                 runs=args.runs)
            row[f"latency_ms_dense_b{batch}"], row[f"latency_ms_pruned_b{batch}"] = lat["first_ms"], lat["second_ms"]
            row[f"speedup_b{batch}"] = lat["speedup"]
        rows.append(row)
        print(row, flush=True)
    lines = [f"# 224x224 ViT-B/16 and DeiT-S shapes, {args.family} family, pruned to 50% FLOPs", "",
             f"Random weights, {args.calib} pseudo-labelled calibration images, reconstruction, one step. "
             f"Latency of the family's own model (dense vs pruned, reloaded), same process. "
             f"Command: `{environment()['command']}`", "",
             "| shape | class | FLOPs kept | params | reload keeps class | speedup b=1 | speedup b=8 | prune s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['class']} | {r['kept_flops']:.3f} | {r['params_pruned'] / 1e6:.1f} M of "
                     f"{r['params_dense'] / 1e6:.1f} M | {r['same_class_after_reload']} | {r['speedup_b1']:.2f}x | "
                     f"{r['speedup_b8']:.2f}x | {r['prune_seconds']:.0f} |")
    write_results(f"families_224_{args.family}", {"environment": environment(), "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
