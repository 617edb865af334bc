"""Honest measurement: params, analytic FLOPs, measured latency and memory, accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from vitrim.bench.accuracy import evaluate
from vitrim.bench.analyze import analyze
from vitrim.bench.flops import cost_breakdown, model_cost
from vitrim.bench.latency import measure_latency
from vitrim.bench.memory import peak_activation_bytes
from vitrim.errors import ConfigError


def measure(model: nn.Module, batch_sizes: Sequence[int] = (1, 64), *, threads: int | None = None,
            runs: int = 30, warmup: int = 5, memory: bool = True) -> dict[str, Any]:
    """Params, FLOPs per image, and per batch size the latency and peak activation memory."""
    if not batch_sizes:
        raise ConfigError("give at least one batch size")
    cost = model_cost(model.config)
    result: dict[str, Any] = {
        "params": sum(p.numel() for p in model.parameters()),
        "flops": cost.flops,
        "threads": threads,
        "latency": {},
    }
    for batch in batch_sizes:
        entry = measure_latency(model, batch, threads=threads, runs=runs, warmup=warmup)
        if memory:
            entry["peak_activation_bytes"] = peak_activation_bytes(model, batch)
        result["latency"][str(batch)] = entry
    return result


__all__ = ["analyze", "cost_breakdown", "evaluate", "measure", "measure_latency", "model_cost",
           "peak_activation_bytes"]
