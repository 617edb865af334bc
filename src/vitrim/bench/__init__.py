"""Honest measurement: params, analytic FLOPs, measured latency and memory, accuracy."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from vitrim.bench.accuracy import evaluate
from vitrim.bench.analyze import analyze
from vitrim.bench.flops import cost_breakdown, model_cost
from vitrim.bench.latency import ThreadChoice, choose_threads, interleaved_latency, measure_latency
from vitrim.bench.memory import peak_activation_bytes
from vitrim.errors import ConfigError


def describe(model: nn.Module) -> dict[str, Any]:
    """Params and analytic FLOPs per image of a torch model."""
    return {"params": sum(p.numel() for p in model.parameters()), "flops": model_cost(model.config).flops}


def measure_many(models: Mapping[str, Any], batch_sizes: Sequence[int] = (1, 64), *,
                 threads: int | ThreadChoice | None = None,
                 runs: int = 30, warmup: int = 5, memory: bool = True, reference: str | None = None,
                 describe_fn: Callable[[Any], dict[str, Any]] = describe,
                 device: str | torch.device | None = None) -> dict[str, dict[str, Any]]:
    """:func:`measure` for several models, their latency timed interleaved in one loop.

    Each result's ``latency[batch]["speedup"]`` is the ``reference`` model's median (default: the
    first model's) over this model's — the ratio of the reported ``median_ms``. ``threads`` is the
    count used and ``thread_policy`` how it was chosen (``threads=None``: the free cores; a
    :class:`~vitrim.bench.latency.ThreadChoice` made earlier is reported as it is). ``device``:
    where torch models run (``None``: where they are; ONNX Runtime sessions stay on the CPU); each
    result's ``device`` names it (CPU model, or GPU name with CUDA / cuDNN versions) and the dtype.
    """
    if not batch_sizes:
        raise ConfigError("give at least one batch size")
    choice = threads if isinstance(threads, ThreadChoice) else choose_threads(threads)
    timed = interleaved_latency(models, batch_sizes, threads=choice.threads, runs=runs, warmup=warmup,
                                reference=reference, device=device)
    results = {name: {**describe_fn(model), "threads": choice.threads, "thread_policy": choice.to_dict(),
                      "device": runner_info(model), "latency": {}} for name, model in models.items()}
    for name, model in models.items():
        for batch in batch_sizes:
            entry = timed[name][batch]
            if memory:
                entry["peak_activation_bytes"] = (peak_activation_bytes(model, batch)
                                                  if isinstance(model, nn.Module) else None)
            results[name]["latency"][str(batch)] = entry
    return results


def runner_info(model: Any) -> dict[str, Any]:
    """:func:`vitrim.device.device_info` of where ``model`` runs, with its dtype (an ONNX Runtime
    session: the CPU, dtype ``onnx``)."""
    from vitrim.bench.latency import runner_device
    from vitrim.device import device_info

    module = model if isinstance(model, nn.Module) else getattr(model, "model", None)
    params = list(module.parameters()) if isinstance(module, nn.Module) else []
    dtype = params[0].dtype if params else "onnx"
    return device_info(runner_device(model), dtype)


def measure(model: nn.Module, batch_sizes: Sequence[int] = (1, 64), *, threads: int | None = None,
            runs: int = 30, warmup: int = 5, memory: bool = True,
            device: str | torch.device | None = None) -> dict[str, Any]:
    """Params, FLOPs per image, and per batch size the latency and peak activation memory.

    ``threads`` is the thread count used (``None``: the cores other processes leave free, see
    :func:`vitrim.bench.latency.default_threads`) and ``thread_policy`` says how it was chosen.
    ``device``: where the model runs (``None``: where it is); ``device`` in the result names it.
    """
    return measure_many({"model": model}, batch_sizes, threads=threads, runs=runs, warmup=warmup,
                        memory=memory, device=device)["model"]


__all__ = ["analyze", "cost_breakdown", "describe", "evaluate", "measure", "measure_latency", "measure_many",
           "model_cost", "peak_activation_bytes"]
