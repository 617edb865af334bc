"""Measured latency: median and spread over many runs after warm-up, at a fixed thread count."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from vitrim.errors import ConfigError


@contextlib.contextmanager
def fixed_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    if threads < 1:
        raise ConfigError(f"thread count must be positive, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def time_callable(fn: Callable[[], Any], *, warmup: int = 5, runs: int = 30,
                  min_seconds: float = 0.0) -> dict[str, float]:
    """Milliseconds per call: median, 10th/90th percentile, runs made."""
    if warmup < 0 or runs < 1:
        raise ConfigError(f"need warmup >= 0 and runs >= 1, got {warmup} and {runs}")
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < runs or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000.0)
    samples.sort()
    q = statistics.quantiles(samples, n=10) if len(samples) > 1 else [samples[0]] * 9
    return {"median_ms": statistics.median(samples), "p10_ms": q[0], "p90_ms": q[-1],
            "runs": len(samples)}


def example_input(model: nn.Module, batch_size: int) -> torch.Tensor:
    cfg = model.config
    if batch_size < 1:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    return torch.randn(batch_size, cfg.in_chans, cfg.image_size, cfg.image_size,
                       generator=torch.Generator().manual_seed(0))


def measure_latency(model: nn.Module, batch_size: int = 1, *, threads: int | None = None,
                    warmup: int = 5, runs: int = 30) -> dict[str, float]:
    """Forward latency of ``model`` on random images of the model's input shape."""
    x = example_input(model, batch_size)
    model.eval()
    with fixed_threads(threads), torch.inference_mode():
        result = time_callable(lambda: model(x), warmup=warmup, runs=runs)
    result["images_per_s"] = batch_size * 1000.0 / result["median_ms"]
    return result


def paired_latency(first: nn.Module, second: nn.Module, batch_size: int = 1, *, threads: int | None = None,
                   warmup: int = 5, runs: int = 30) -> dict[str, float]:
    """Median latency of two models timed alternately in one loop (drift hits both alike)."""
    x = example_input(first, batch_size)
    first.eval()
    second.eval()
    samples: dict[str, list[float]] = {"first": [], "second": []}
    with fixed_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            first(x)
            second(x)
        for _ in range(runs):
            for name, model in (("first", first), ("second", second)):
                t0 = time.perf_counter()
                model(x)
                samples[name].append((time.perf_counter() - t0) * 1000.0)
    a, b = statistics.median(samples["first"]), statistics.median(samples["second"])
    return {"first_ms": a, "second_ms": b, "speedup": a / b, "runs": runs}
