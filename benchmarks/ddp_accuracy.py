"""One process against two (gloo, torchrun) for the same global batch: distil a student from the
bundled model for one epoch on Fashion-MNIST both ways, then evaluate both on the test set.

DDP with a global batch of B split over two processes should train the model one process trains
with batch B, so the two accuracies should agree within float noise (the aim: +-0.1 pt). Speed is
not the point on a 2-core machine; each process gets one thread when there are two.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ddp_accuracy.py

``--quick`` trains on 512 images and evaluates on 256 (a smoke test, about a minute).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results  # noqa: E402

import vitrim  # noqa: E402
from vitrim.data import load_dataset  # noqa: E402


def train_command(args: argparse.Namespace, out: Path, processes: int) -> list[str]:
    per_process = args.global_batch // processes
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
                if processes > 1 else [sys.executable])
    command = launcher + ["-m", "vitrim", "train", "--model", args.student, "--teacher", args.teacher,
                          "--epochs", str(args.epochs), "--batch-size", str(per_process), "--lr", str(args.lr),
                          "--seed", str(args.seed), "--threads", str(max(1, args.threads // processes)),
                          "--no-eval", "--out", str(out)]
    return command + (["--limit", str(args.limit)] if args.limit else [])


def run(args: argparse.Namespace, work: Path, processes: int) -> dict[str, Any]:
    out = work / f"student-{processes}"
    command = train_command(args, out, processes)
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // processes))}
    subprocess.run(command, check=True, env=env)
    seconds = time.perf_counter() - started
    test = load_dataset("fashion-mnist", "test")
    if args.eval_limit:
        test = test.subset(args.eval_limit)
    model = vitrim.load(out)
    metrics = vitrim.evaluate(model, test)
    return {"processes": processes, "per_process_batch": args.global_batch // processes,
            "global_batch": args.global_batch, "seconds": round(seconds, 1), "accuracy": metrics["accuracy"],
            "loss": metrics["loss"], "count": metrics["count"], "state": {k: v.clone() for k, v in
                                                                        model.state_dict().items()},
            "command": ("python " + " ".join(command[1:])).replace(str(work), "WORK")}


def weight_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest absolute difference between two state dicts, and where it is."""
    return max(((float((a[k].float() - b[k].float()).abs().max()), k) for k in a if a[k].numel()),
               default=(0.0, ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="fmnist-vit-micro")
    parser.add_argument("--teacher", default="fmnist-vit")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--global-batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="train on the first N images")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test images")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--name", default="ddp_accuracy")
    args = parser.parse_args()
    if args.quick:
        args.limit, args.eval_limit, args.name = 512, 256, args.name + "_quick"
    work = Path(tempfile.mkdtemp(prefix="vitrim-ddp-"))
    try:
        rows = [run(args, work, 1), run(args, work, 2)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gap, where = weight_gap(rows[0].pop("state"), rows[1].pop("state"))
    difference = (rows[1]["accuracy"] - rows[0]["accuracy"]) * 100
    result = {"environment": environment(), "rows": rows, "accuracy_difference_points": difference,
              "max_weight_difference": gap, "max_weight_difference_at": where, "aim_points": 0.1,
              "aim_met": abs(difference) <= 0.1}
    lines = [f"# One process vs two (DDP, gloo) for the same global batch: {args.student} distilled from "
             f"{args.teacher}", "",
             f"{args.epochs} epoch(s) of distillation on Fashion-MNIST{f' (first {args.limit} images)' if args.limit else ''}, "
             f"global batch {args.global_batch}, seed {args.seed}; accuracy on "
             f"{rows[0]['count']} test images. Command: `{environment()['command']}`", "",
             "| processes | batch per process | accuracy | loss | train time |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['processes']} | {r['per_process_batch']} | {r['accuracy'] * 100:.2f}% | {r['loss']:.4f} | "
                     f"{r['seconds']:.0f} s |")
    lines += ["", f"Accuracy difference (2 - 1 processes): {difference:+.2f} pt (aim: within +-0.1 pt: "
              f"{'met' if result['aim_met'] else 'missed'}). Largest weight difference: {gap:.2e} ({where}).", "",
              "Training commands (WORK is a temporary directory):", ""]
    lines += [f"    {r['command']}" for r in rows]
    write_results(args.name, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
