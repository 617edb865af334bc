"""Run-time token reduction compared across knob values: accuracy, FLOPs kept and speed-up of each
value against the dense model, all timed interleaved (what ``vitrim tokens`` prints)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vitrim.bench.accuracy import evaluate
from vitrim.bench.flops import model_cost
from vitrim.bench.latency import WithSetting, example_input, interleaved_latency


def reduced_view(model: nn.Module, method: str | None, layers: Sequence[int] | None, mode: str) -> tuple[Any, Any, str]:
    """``(dense, reduced, method)``: an incremental-resolution model sweeps its own knob against a
    copy of itself; any other model gets :func:`vitrim.tokens.reduce_tokens`."""
    from vitrim.iret import IncrementalViT
    from vitrim.tokens import reduce_tokens

    if isinstance(model, IncrementalViT):  # its own knob; compared against itself with every detail
        dense = copy.deepcopy(model)  # before the mode is set: the reference runs with every detail
        model.mode = mode
        return dense, model, "iret"
    reduced = reduce_tokens(model, method, layers=layers, mode=mode)
    return model, reduced, reduced.method


def speedup_columns(knob: str, rows: Sequence[dict[str, Any]], dense_latency: dict[str, Any],
                    batch_sizes: Sequence[int]) -> tuple[list[list[str]], list[tuple[str, int, Any]]]:
    """``(cells, figures)`` for a sweep's table: per row its speed-up per batch size (``*`` when
    either timing is unstable), and every timing labelled by its knob value for
    :func:`~vitrim.bench.latency.unstable_warning`."""
    cells = [[f"{r[f'speedup_b{b}']:.2f}x" + ("" if r["latency"][str(b)]["stable"] and dense_latency[str(b)]["stable"]
                                              else "*") for b in batch_sizes] for r in rows]
    figures = [("dense", b, dense_latency[str(b)]) for b in batch_sizes]
    figures += [(f"{knob}={r[knob]:g}", b, r["latency"][str(b)]) for r in rows for b in batch_sizes]
    return cells, figures


def token_sweep(model: nn.Module, reduced: Any, knob: str, values: Sequence[float], *, test: Any = None,
                batch_sizes: Sequence[int] = (1, 64), threads: int | None = None,
                runs: int = 30,
                device: str | torch.device | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``(rows, dense_latency)``: per value of ``knob`` (``keep`` or ``tau``) its accuracy on ``test``
    (when given), FLOPs ratio and latency / speed-up per batch size; the dense model's latency.
    Under ``torchrun`` every rank evaluates its shard (the accuracy is the single-process one) and
    rank 0 alone times; the other ranks return rows without latency and an empty ``dense_latency``.

    ``device``: where both models run (``None``: where ``model`` is)."""
    from vitrim import distributed
    from vitrim.device import module_device, resolve_device
    from vitrim.tokens import reduced_flops

    target = module_device(model) if device is None else resolve_device(device)
    model.to(target)
    reduced.to(target)

    for value in values:  # validate every knob value before any work
        setattr(reduced, knob, value)
    cfg = model.config
    dense_flops = model_cost(cfg).flops
    rows: list[dict[str, Any]] = []
    for value in values:
        setattr(reduced, knob, value)
        row: dict[str, Any] = {knob: value}
        if test is not None:
            row["accuracy"] = evaluate(reduced, test, image_size=cfg.image_size, device=target)["accuracy"]
        sample = next(test.batches(64, image_size=cfg.image_size, device=target))[0] if test is not None \
            else torch.randn(64, cfg.in_chans, cfg.image_size, cfg.image_size, device=target)
        row["flops_ratio"] = reduced_flops(reduced, sample) / dense_flops
        rows.append(row)
    if not distributed.is_main():  # under torchrun the accuracy is everyone's; the timing rank 0's alone
        return rows, {}
    runners = {"dense": model, **{f"{knob}={i}": WithSetting(reduced, **{knob: v}) for i, v in enumerate(values)}}
    timed = interleaved_latency(runners, batch_sizes, threads=threads, runs=runs, device=target,
                                example=lambda b: example_input(model, b))  # dense and every value interleaved
    for i, row in enumerate(rows):
        stats = timed[f"{knob}={i}"]
        row.update({f"speedup_b{b}": stats[b]["speedup"] for b in batch_sizes})
        row["latency"] = {str(b): stats[b] for b in batch_sizes}
    return rows, {str(b): timed["dense"][b] for b in batch_sizes}
