"""Time and peak memory of pruning ViT-B/16 at 224x224 on this CPU: Fisher saliency, the budgeted
search and least-squares reconstruction on 256 calibration images (``vitrim.prune``; by default
3 steps, each scoring the model it has so far; ``--steps 1`` scores once).

Random weights and random labelled images (a speed and memory check; no accuracy):

    .venv/bin/python benchmarks/vitb_prune_cpu.py --threads 2

The time of each phase comes from the moments ``vitrim.prune`` reports its steps; peak memory is
the process's peak resident set (``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results  # noqa: E402

import vitrim  # noqa: E402
from vitrim.bench.flops import model_cost  # noqa: E402
from vitrim.data.dataset import ImageSet  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit-base")
    parser.add_argument("--target", default="flops=0.5")
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32, help="saliency / reconstruction batch")
    parser.add_argument("--steps", type=int, default=3, help="pruning steps, each with its own saliency pass")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="vit-tiny on 16 images (a smoke test)")
    parser.add_argument("--name", default="vitb_prune_cpu")
    args = parser.parse_args()
    if args.quick:
        args.model, args.calib, args.batch_size, args.name = "vit-tiny", 16, 8, args.name + "_quick"
    torch.set_num_threads(args.threads)
    model = vitrim.create(args.model, seed=0)
    cfg = model.config
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.calib, cfg.in_chans, cfg.image_size, cfg.image_size), dtype=torch.uint8,
                           generator=generator)
    labels = torch.randint(0, cfg.num_classes, (args.calib,), generator=generator)
    data = ImageSet(images, labels, [str(i) for i in range(cfg.num_classes)], cfg.mean, cfg.std, name="random")
    base_rss = peak_rss_mb()
    events: list[tuple[float, str]] = []
    started = time.perf_counter()

    def log(text: str) -> None:
        events.append((time.perf_counter() - started, text))
        print(f"[{events[-1][0]:7.1f} s] {text}", flush=True)

    result = vitrim.prune(model, args.target, data, recover="reconstruct", calib_images=args.calib,
                          batch_size=args.batch_size, steps=args.steps, log=log, progress=True)
    total = time.perf_counter() - started
    step_times = [t for t, text in events if text.startswith("step ")]
    phases: dict[str, Any] = {f"step {i + 1} (saliency + search)": round(t - (step_times[i - 1] if i else 0.0), 1)
                              for i, t in enumerate(step_times)}
    phases["reconstruction"] = round(total - (step_times[-1] if step_times else 0.0), 1)
    row = {"model": args.model, "params": model_cost(cfg).params, "target": args.target,
           "kept_ratio": result.kept_ratio, "calib_images": args.calib, "batch_size": args.batch_size,
           "threads": args.threads, "steps": args.steps, "seconds": round(total, 1), "phases": phases,
           "peak_rss_mb": round(peak_rss_mb()), "rss_before_mb": round(base_rss)}
    lines = [f"# Pruning {args.model} on the CPU: time and peak memory", "",
             f"{args.target} with Fisher saliency ({args.steps} step(s)) and least-squares reconstruction on {args.calib} "
             f"random calibration images at {cfg.image_size}x{cfg.image_size}, batch {args.batch_size}, "
             f"{args.threads} threads, {environment()['device']}. Command: `{environment()['command']}`", "",
             "| phase | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds} |" for name, seconds in phases.items()]
    lines += [f"| **total** | **{row['seconds']}** |", "",
              f"Kept {result.kept_ratio:.4f} of the FLOPs. Peak resident memory {row['peak_rss_mb']:,} MB "
              f"({row['rss_before_mb']:,} MB before pruning: the model and the images)."]
    write_results(args.name, {"environment": environment(), **row}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
