"""Params, FLOPs and latency of an ONNX model, in the same shape as ``vitrim.measure``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vitrim.bench import measure_many
from vitrim.bench.flops import model_cost
from vitrim.bench.latency import ThreadChoice, choose_threads, usable_cores
from vitrim.errors import ConfigError
from vitrim.models import ViTConfig
from vitrim.quant.runtime import OnnxModel


def describe_onnx(model: OnnxModel) -> dict[str, Any]:
    """Params/FLOPs from the vitrim config if present (else stored elements and None), scheme, size."""
    cfg = model.config
    cost = model_cost(cfg) if isinstance(cfg, ViTConfig) else None
    return {"params": cost.params if cost else model.stored_elements, "flops": cost.flops if cost else None,
            "runtime": "onnxruntime", "scheme": (model.quantization or {}).get("scheme", "fp32"),
            "size_bytes": model.size_bytes}


def with_threads(model: OnnxModel, threads: int, *, required: bool = True) -> OnnxModel:
    """``model``, reopened with ``threads`` intra-op threads if it has another count.

    An in-memory model cannot be reopened: it raises :class:`ConfigError` if ``required``, else
    keeps its own count.
    """
    if threads == model.threads:
        return model
    if model.path is None:
        if required:
            raise ConfigError("an in-memory ONNX model keeps the thread count it was opened with; open it with "
                              "OnnxModel(..., threads=N) or leave threads unset")
        return model
    return OnnxModel(model.path, threads=threads, preprocessing=model.preprocessing, name=model.name)


def measure_onnx(model: OnnxModel, batch_sizes: Sequence[int] = (1, 64), *, threads: int | None = None,
                 runs: int = 30, warmup: int = 5) -> dict[str, Any]:
    """Latency per batch size through ONNX Runtime; params/FLOPs from the vitrim config if present.

    Without a vitrim config, ``params`` counts the elements stored in the file and ``flops`` is None.
    ``threads=None`` keeps the count the session was opened with; ``threads`` and ``thread_policy``
    in the result say what was used.

    ``peak_activation_bytes`` is ``None`` (the torch profiler cannot see inside ORT).
    """
    if not batch_sizes:
        raise ConfigError("give at least one batch size")
    if threads is None:
        choice = ThreadChoice(model.threads, "session", len(usable_cores()))
    else:
        choice = choose_threads(threads)
        model = with_threads(model, threads)
    return measure_many({"model": model}, batch_sizes, threads=choice, runs=runs, warmup=warmup,
                        describe_fn=describe_onnx)["model"]
