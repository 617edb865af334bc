"""The width multiple kept dimensions are rounded to, chosen by measuring this device's kernels.

A matrix product's time does not fall smoothly with its width: vector units and GEMM tiles work
in multiples (8 fp32 lanes with AVX2, 16 with AVX-512, tensor-core tiles on GPUs), so a width just
above a multiple costs about as much as the next multiple. :func:`measured_round_to` times the
model's own MLP input projection (its token count, embedding width) at every width of a window
below the full MLP width, and picks the smallest multiple whose widths run as fast per unit as
the best multiple's — the finest budget granularity that gives up no speed.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vitrim.bench.latency import fixed_threads, time_callable

MULTIPLES = (1, 8, 16, 32, 64)
SLACK = 0.02  # a multiple within 2% of the best one's mean time per unit counts as fast


def width_times(tokens: int, embed: int, widths: Sequence[int], *, batch: int = 1, runs: int = 15,
                device: torch.device | None = None, threads: int | None = None) -> dict[int, float]:
    """Median milliseconds of ``Linear(embed, w)`` on ``(batch * tokens, embed)`` for each width."""
    x = torch.randn(batch * tokens, embed, device=device)
    out = {}
    with fixed_threads(threads or torch.get_num_threads()), torch.inference_mode():
        for w in widths:
            layer = nn.Linear(embed, w).to(device)
            out[w] = time_callable(lambda: layer(x), warmup=3, runs=runs, device=device)["median_ms"]
    return out


def choose_multiple(times: dict[int, float], multiples: Sequence[int] = MULTIPLES, slack: float = SLACK) -> int:
    """The smallest multiple whose widths' time per unit is within ``slack`` of the best multiple's."""
    per_unit = {}
    for m in multiples:
        own = [t / w for w, t in times.items() if w % m == 0]
        if own:
            per_unit[m] = statistics.fmean(own)
    best = min(per_unit.values())
    return min(m for m, v in per_unit.items() if v <= best * (1 + slack))


def measured_round_to(model: Any, *, batch: int = 1, device: torch.device | None = None,
                      threads: int | None = None, runs: int = 15) -> tuple[int, dict[str, Any]]:
    """``(round_to, evidence)`` for ``model`` on ``device``: see the module docstring."""
    cfg = model.config
    mlp = max((b.mlp_dim for b in cfg.blocks if b.mlp), default=cfg.embed_dim)
    top = max(64, mlp // 64 * 64)
    low = max(1, top - 256)
    times = width_times(cfg.num_tokens, cfg.embed_dim, range(low, top + 1), batch=batch, runs=runs, device=device,
                        threads=threads)
    widths = [max((getattr(b, kind) for b in cfg.blocks), default=0) for kind in ("qk_dim", "v_dim", "mlp_dim")]
    cap = min([w for w in widths if w] + [cfg.embed_dim])  # no multiple wider than a layer it rounds
    chosen = choose_multiple(times, [m for m in MULTIPLES if m <= cap] or [1])
    return chosen, {"round_to": chosen, "widths": [low, top], "tokens": cfg.num_tokens, "embed": cfg.embed_dim,
                    "batch": batch}


__all__ = ["choose_multiple", "measured_round_to", "width_times"]
