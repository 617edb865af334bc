"""Measuring any model vitrim runs — torch (any family, by its own forward), ONNX Runtime sessions,
integer-only simulations — the same way: params, FLOPs, latency timed interleaved, accuracy.

``vitrim bench``, ``vitrim prune``'s dense-vs-pruned report and :func:`vitrim.compress.compress`'s
stage table all come from here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vitrim.bench import describe, measure, measure_many
from vitrim.bench.accuracy import evaluate
from vitrim.bench.latency import ThreadChoice, choose_threads


def _is_onnx(model: Any) -> bool:
    from vitrim.quant.runtime import OnnxModel

    return isinstance(model, OnnxModel)


def _describe(model: Any) -> dict[str, Any]:
    from vitrim.quant.bench import describe_onnx

    return describe_onnx(model) if _is_onnx(model) else describe(model)


def measure_any(model: Any, batch_sizes: Sequence[int], *, threads: int | None = None,
                runs: int = 30, device: Any = None) -> dict[str, Any]:
    """``vitrim.measure`` for torch models, :func:`vitrim.quant.measure_onnx` for ONNX models.

    ``model`` may be a mapping ``{name: model}`` of torch and ONNX models: they are then timed
    interleaved (see :func:`measure_all`) and the result maps each name to its measurement.
    """
    if isinstance(model, Mapping):
        return measure_all(model, batch_sizes, threads=threads, runs=runs, device=device)
    if _is_onnx(model):
        from vitrim.quant.bench import measure_onnx

        return measure_onnx(model, batch_sizes, threads=threads, runs=runs)
    return measure(model, batch_sizes, threads=threads, runs=runs, device=device)


def measure_all(models: Mapping[str, Any], batch_sizes: Sequence[int], *, threads: Any = None,
                runs: int = 30, memory: bool = True, device: Any = None) -> dict[str, dict[str, Any]]:
    """Torch and ONNX models timed interleaved in one loop at one thread count.

    ``threads``: a count, None (the free cores) or a ``ThreadChoice`` already made. Each
    ``latency[batch]["speedup"]`` is the first model's median over this model's. ONNX sessions
    opened with another thread count are reopened with the one chosen. ``memory``: also the peak
    activation memory of torch models. ``device``: where torch models run (ONNX Runtime sessions
    stay on the CPU); each result's ``device`` names it and the dtype.
    """
    from vitrim.quant.bench import with_threads

    choice = threads if isinstance(threads, ThreadChoice) else choose_threads(threads)
    ready = {name: with_threads(m, choice.threads) if _is_onnx(m) else m for name, m in models.items()}
    return measure_many(ready, batch_sizes, threads=choice, runs=runs, memory=memory, describe_fn=_describe,
                        device=device)


def compare_models(models: Mapping[str, Any], batch_sizes: Sequence[int] = (1, 64), *, test: Any = None,
                   image_size: int | None = None, threads: Any = None, runs: int = 30, progress: bool = False,
                   desc: str = "eval {name}", log: Callable[[str], None] = lambda text: None,
                   device: Any = None) -> dict[str, dict[str, Any]]:
    """Models compared for a report: each one's top-1 ``accuracy`` on ``test`` (when given), then
    params, FLOPs and latency of all of them timed interleaved (:func:`measure_all`, no memory
    profile); every ``speedup`` is against the first model. ``device``: where torch models run.

    Under ``torchrun`` the accuracy is sharded over the ranks (every rank gets the whole figure)
    and only rank 0 times (the others would compete for its cores): their results carry no
    ``latency``."""
    from vitrim import distributed

    accuracy = {}
    if test is not None:
        for name, model in models.items():
            log(f"evaluating {name}")
            accuracy[name] = evaluate(model, test, image_size=image_size, progress=progress,
                                      desc=desc.format(name=name), device=device)["accuracy"]
    if distributed.is_main():
        log("timing every model, interleaved")
        results = measure_all(models, batch_sizes, threads=threads, runs=runs, memory=False, device=device)
    else:
        results = {name: _describe(model) for name, model in models.items()}
    for name, value in accuracy.items():
        results[name]["accuracy"] = value
    return results


__all__ = ["compare_models", "measure_all", "measure_any"]
