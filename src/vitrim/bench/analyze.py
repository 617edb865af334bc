"""Per-block complexity analysis: params, FLOPs and measured latency of every component."""

from __future__ import annotations

from typing import Any

import torch

from vitrim.bench.flops import cost_breakdown
from vitrim.bench.latency import example_input, fixed_threads, time_callable
from vitrim.models import VisionTransformer


def component_callables(model: VisionTransformer, x: torch.Tensor) -> dict[str, Any]:
    """One zero-argument callable per component, fed the inputs the component really sees."""
    calls: dict[str, Any] = {"embedding": lambda: model.embed(x)}
    h = model.embed(x)
    for i, block in enumerate(model.blocks):
        if block.attn is not None:
            calls[f"block{i}.attention"] = (lambda b=block, t=h: b.attention_branch(t))
            h = h + block.attention_branch(h)
        else:
            calls[f"block{i}.attention"] = None
        if block.mlp is not None:
            calls[f"block{i}.mlp"] = (lambda b=block, t=h: b.mlp_branch(t))
            h = h + block.mlp_branch(h)
        else:
            calls[f"block{i}.mlp"] = None
    calls["head"] = lambda t=h: model.classify(model.final_norm(t))
    return calls


def analyze(model: VisionTransformer, batch_size: int = 1, threads: int | None = None,
            runs: int = 20) -> list[dict[str, Any]]:
    """Rows ``{component, params, flops, latency_ms, *_share}`` over the whole model."""
    model.eval()
    costs = cost_breakdown(model.config)
    x = example_input(model, batch_size)
    with fixed_threads(threads), torch.inference_mode():
        calls = component_callables(model, x)
        latency = {name: (time_callable(fn, warmup=3, runs=runs)["median_ms"] if fn else 0.0)
                   for name, fn in calls.items()}
    totals = {"params": sum(c.params for c in costs.values()), "flops": sum(c.flops for c in costs.values()),
              "latency_ms": sum(latency.values())}
    rows = []
    for name, cost in costs.items():
        row = {"component": name, "params": cost.params, "flops": cost.flops, "latency_ms": latency[name]}
        for key in ("params", "flops", "latency_ms"):
            row[f"{key.removesuffix('_ms')}_share"] = row[key] / totals[key] if totals[key] else 0.0
        rows.append(row)
    return rows
