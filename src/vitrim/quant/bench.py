"""Params, FLOPs and latency of an ONNX model, in the same shape as ``vitrim.measure``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vitrim.bench.flops import model_cost
from vitrim.bench.latency import measure_latency
from vitrim.errors import ConfigError
from vitrim.models import ViTConfig
from vitrim.quant.runtime import OnnxModel


def measure_onnx(model: OnnxModel, batch_sizes: Sequence[int] = (1, 64), *, threads: int | None = None,
                 runs: int = 30, warmup: int = 5) -> dict[str, Any]:
    """Latency per batch size through ONNX Runtime; params/FLOPs from the vitrim config if present.

    Without a vitrim config, ``params`` counts the elements stored in the file and ``flops`` is None.

    ``peak_activation_bytes`` is ``None`` (the torch profiler cannot see inside ORT).
    """
    if not batch_sizes:
        raise ConfigError("give at least one batch size")
    if threads is not None and threads != model.threads:
        if model.path is None:
            raise ConfigError("an in-memory ONNX model keeps the thread count it was opened with")
        model = OnnxModel(model.path, threads=threads, preprocessing=model.preprocessing)
    cfg = model.config
    cost = model_cost(cfg) if isinstance(cfg, ViTConfig) else None
    result: dict[str, Any] = {
        "params": cost.params if cost else model.stored_elements,
        "flops": cost.flops if cost else None,
        "threads": model.threads,
        "runtime": "onnxruntime",
        "scheme": (model.quantization or {}).get("scheme", "fp32"),
        "size_bytes": model.size_bytes,
        "latency": {},
    }
    for batch in batch_sizes:
        entry = measure_latency(model, batch, runs=runs, warmup=warmup)
        entry["peak_activation_bytes"] = None
        result["latency"][str(batch)] = entry
    return result
