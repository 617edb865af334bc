"""Shared helpers for the benchmark scripts: results written atomically as JSON + markdown."""

from __future__ import annotations

import json
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from vitrim.fsutil import write_json, write_text

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict[str, Any]:
    from vitrim.prune.latency import device_name

    return {"device": device_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(),
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}


def write_results(name: str, data: dict[str, Any], markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{name}.json", data)
    write_text(RESULTS / f"{name}.md", markdown)
    print(markdown)
    print(f"wrote {RESULTS / (name + '.json')} and {RESULTS / (name + '.md')}")


def load_reference(model_name: str, threads: int, eval_limit: int | None):
    """The dense model, the test images (first ``eval_limit``) and its accuracy on them."""
    import vitrim
    from vitrim.data import load_dataset

    torch.set_num_threads(threads)
    dense = vitrim.load(model_name)
    test = load_dataset("fashion-mnist", "test")
    if eval_limit:
        test = test.subset(eval_limit)
    test = test.resized(dense.config.image_size)  # 56x56 for fmnist-vit-197
    return dense, test, vitrim.evaluate(dense, test)["accuracy"]


def speedup_cell(row: dict[str, Any], batch: int) -> str:
    """``1.76x (1.02/1.03)``: the speed-up and both models' p90/p10 spread, ``*`` when unstable."""
    timing = row.get(f"timing_b{batch}")
    if timing is None:  # results recorded before the spread was kept
        return f"{row[f'speedup_b{batch}']:.2f}x"
    flag = "" if timing["stable"] else "*"
    return f"{timing['speedup']:.2f}x{flag} ({timing['first_spread']:.2f}/{timing['second_spread']:.2f})"


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(values: list[float]) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.float64)
        order = torch.argsort(t)
        r = torch.empty_like(t)
        r[order] = torch.arange(len(values), dtype=torch.float64)
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2)
