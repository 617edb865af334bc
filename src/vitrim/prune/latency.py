"""Measured latency as a pruning cost: a per-device lookup table of sub-layer latencies.

For one model shape (tokens N, embedding C, heads H, qk/v dims, MLP width M) the table times
real attention and MLP sub-layers (LayerNorm, projections, fused attention, GELU) and the
embedding + head on a grid of smaller sizes, then interpolates multilinearly between grid
points. Tables are cached on disk, keyed by device (CPU model, or ``cuda:<GPU name>``), thread
count, dtype, batch size and the grid.

A cached table is checked before it is used: the full-size attention and MLP sub-layers are timed
again (a few runs) and compared with the table. When the machine's state changed since it was
measured — a figure off by more than :data:`STALE_LIMIT`, or the table measured while other
processes kept a core busy and the machine is quieter now — it is measured again, with a warning.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitrim.bench.latency import LoadProbe, busy_cores, fixed_threads, time_callable
from vitrim.fsutil import write_json
from vitrim.models.config import BlockDims, ViTConfig
from vitrim.models.vit import Block, VisionTransformer
from vitrim.progress import progress_bar
from vitrim.prune.cost import CostModel


def device_name(device: torch.device | None = None) -> str:
    """The table key's device: the CPU model (default), or ``cuda:<GPU name>``."""
    from vitrim.device import device_label

    return device_label(device or torch.device("cpu"))


def grid_points(full: int, count: int, multiple: int = 8) -> list[int]:
    """``count`` sizes from about full/count up to ``full``, rounded to ``multiple``."""
    points = {full}
    for k in range(1, count):
        points.add(max(1, round(full * k / count / multiple) * multiple))
    return sorted(points)


def interpolate(axes: list[list[int]], values: np.ndarray, point: tuple[float, ...]) -> float:
    """Multilinear interpolation on a rectilinear grid (clamped at its edges, linear outside low end)."""
    if not axes:
        return float(values)
    axis, rest = np.asarray(axes[0], dtype=float), axes[1:]
    x = point[0]
    if len(axis) == 1:
        return interpolate(rest, values[0], point[1:])
    i = int(np.clip(np.searchsorted(axis, x) - 1, 0, len(axis) - 2))
    t = (x - axis[i]) / (axis[i + 1] - axis[i])
    t = min(t, 1.0)  # no extrapolation above the dense size; linear below the smallest point
    lo = interpolate(rest, values[i], point[1:])
    hi = interpolate(rest, values[i + 1], point[1:])
    return max(0.0, lo + t * (hi - lo))


@dataclass
class LatencyTable:
    """Milliseconds per sub-layer on a grid; see the module docstring."""

    key: dict[str, Any]
    attn_axes: list[list[int]]  # C, H, qk, v
    attn_ms: np.ndarray
    mlp_axes: list[list[int]]  # C, M
    mlp_ms: np.ndarray
    fixed_axes: list[list[int]]  # C
    fixed_ms: np.ndarray
    busy_cores: float | None = None  # cores other processes kept busy while it was measured
    probe: dict[str, float] = field(default_factory=dict)  # full-size sub-layer ms, for the freshness check

    def attention(self, C: int, dims: BlockDims, tokens: int) -> float:
        return interpolate(self.attn_axes, self.attn_ms, (C, dims.heads, dims.qk_dim, dims.v_dim))

    def mlp(self, C: int, dims: BlockDims, tokens: int) -> float:
        return interpolate(self.mlp_axes, self.mlp_ms, (C, dims.mlp_dim))

    def fixed(self, cfg: ViTConfig) -> float:
        return interpolate(self.fixed_axes, self.fixed_ms, (cfg.embed_dim,))

    def cost_model(self) -> CostModel:
        return CostModel("latency", attention=self.attention, mlp=self.mlp, fixed=self.fixed)

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "attn_axes": self.attn_axes, "attn_ms": self.attn_ms.tolist(),
                "mlp_axes": self.mlp_axes, "mlp_ms": self.mlp_ms.tolist(),
                "fixed_axes": self.fixed_axes, "fixed_ms": self.fixed_ms.tolist(), "busy_cores": self.busy_cores,
                "probe": self.probe}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LatencyTable":
        return cls(data["key"], data["attn_axes"], np.asarray(data["attn_ms"]), data["mlp_axes"],
                   np.asarray(data["mlp_ms"]), data["fixed_axes"], np.asarray(data["fixed_ms"]),
                   data.get("busy_cores"), data.get("probe", {}))

    @classmethod
    def for_model(cls, model: VisionTransformer, *, batch_size: int = 1, threads: int | None = None,
                  points: int = 4, runs: int = 15, cache_dir: str | Path | None = None,
                  progress: bool = False, device: str | torch.device | None = "cpu") -> "LatencyTable":
        """Load the cached table for this model shape and ``device``, or measure and cache it."""
        from vitrim.device import resolve_device

        target = resolve_device(device)
        cfg = model.config
        attn_blocks = [b for b in cfg.blocks if b.attention]
        H = max((b.heads for b in attn_blocks), default=1)
        qk = max((b.qk_dim for b in attn_blocks), default=8)
        v = max((b.v_dim for b in attn_blocks), default=8)
        M = max((b.mlp_dim for b in cfg.blocks if b.mlp), default=8)
        key = {"device": device_name(target), "threads": threads or torch.get_num_threads(), "dtype": "float32",
               "batch": batch_size, "tokens": cfg.num_tokens, "embed": cfg.embed_dim, "heads": H, "qk": qk,
               "v": v, "mlp": M, "points": points, "patch": cfg.patch_size, "in_chans": cfg.in_chans,
               "classes": cfg.num_classes, "torch": torch.__version__}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        root = Path(cache_dir or os.environ.get("VITRIM_CACHE") or Path.home() / ".cache" / "vitrim")
        path = root / "latency" / f"{digest}.json"
        if path.is_file():
            try:
                cached = cls.from_dict(json.loads(path.read_text()))
            except (json.JSONDecodeError, KeyError):
                cached = None  # a damaged cache entry is measured again
            if cached is not None:
                reason = staleness(cached, target)
                if reason is None:
                    return cached
                warnings.warn(f"the latency table in {path} no longer describes this machine ({reason}); "
                              f"measuring it again", stacklevel=2)
        table = measure_table(cfg, key, points=points, runs=runs, progress=progress, device=target)
        write_json(path, table.to_dict())
        return table


STALE_LIMIT = 0.3  # a probe off by more than 30% from the table means it was measured in another state
BUSY_LIMIT = 0.5  # cores other processes may keep busy before a table counts as measured under load


def probe_ms(table: LatencyTable, device: torch.device | None = None, runs: int = 7) -> dict[str, float]:
    """The full-size attention and MLP sub-layers of ``table``'s shape, timed now."""
    key = table.key
    sub = ViTConfig(image_size=key["patch"], patch_size=key["patch"], in_chans=key["in_chans"],
                    num_classes=key["classes"], embed_dim=key["embed"],
                    blocks=[{"heads": 1, "qk_dim": 1, "v_dim": 1, "mlp_dim": 1}],
                    mean=(0.5,) * key["in_chans"], std=(0.25,) * key["in_chans"])
    x = torch.randn(key["batch"], key["tokens"], key["embed"], device=device)
    out = {}
    with fixed_threads(key["threads"]), torch.inference_mode():
        for name, dims in (("attn", BlockDims(key["heads"], key["qk"], key["v"], 0, mlp=False)),
                           ("mlp", BlockDims(0, 0, 0, key["mlp"], attention=False))):
            block = _block(sub, dims).to(device)
            out[name] = time_callable(lambda: block(x), warmup=2, runs=runs, device=device)["median_ms"]
    return out


def staleness(table: LatencyTable, device: torch.device | None = None) -> str | None:
    """Why ``table`` should be measured again on this machine now, or None when it still holds."""
    if not table.probe:
        return "it predates the freshness check"
    now = probe_ms(table, device)
    for name, then in table.probe.items():
        ratio = now[name] / max(then, 1e-9)
        if abs(ratio - 1) > STALE_LIMIT:
            return f"its full-size {name} sub-layer took {then:.3f} ms then and {now[name]:.3f} ms now"
    if (table.busy_cores or 0) > BUSY_LIMIT and (busy := busy_cores()) is not None and busy < BUSY_LIMIT:
        return f"it was measured while other processes kept {table.busy_cores:.1f} cores busy, and they are idle now"
    return None


def _block(cfg: ViTConfig, dims: BlockDims) -> Block:
    return Block(cfg, dims).eval()


def measure_table(cfg: ViTConfig, key: dict[str, Any], *, points: int, runs: int,
                  progress: bool, device: torch.device | None = None) -> LatencyTable:
    """Time every grid point's sub-layers on ``device`` (default: the CPU)."""
    device = device or torch.device("cpu")
    C, N, B = key["embed"], key["tokens"], key["batch"]
    c_axis = grid_points(C, points)
    h_axis = sorted({1, max(1, key["heads"] // 2), key["heads"]})
    qk_axis, v_axis = grid_points(key["qk"], points), grid_points(key["v"], points)
    m_axis = grid_points(key["mlp"], points + 2)
    attn_ms = np.zeros((len(c_axis), len(h_axis), len(qk_axis), len(v_axis)))
    mlp_ms = np.zeros((len(c_axis), len(m_axis)))
    fixed_ms = np.zeros(len(c_axis))
    jobs = [("attn", idx) for idx in itertools.product(*(range(len(a)) for a in (c_axis, h_axis, qk_axis, v_axis)))]
    jobs += [("mlp", idx) for idx in itertools.product(range(len(c_axis)), range(len(m_axis)))]
    jobs += [("fixed", (i,)) for i in range(len(c_axis))]
    load = LoadProbe().start()
    with fixed_threads(key["threads"]), torch.inference_mode():
        for kind, idx in progress_bar(jobs, total=len(jobs), desc="latency table", enabled=progress):
            c = c_axis[idx[0]]
            sub = cfg.replace(embed_dim=c, blocks=[{"heads": 1, "qk_dim": 1, "v_dim": 1, "mlp_dim": 1}],
                              mean=list(cfg.mean), std=list(cfg.std))
            x = torch.randn(B, N, c, device=device)
            if kind == "attn":
                dims = BlockDims(h_axis[idx[1]], qk_axis[idx[2]], v_axis[idx[3]], 0, mlp=False)
                block = _block(sub, dims).to(device)
                fn = lambda: block(x)  # noqa: E731
            elif kind == "mlp":
                dims = BlockDims(0, 0, 0, m_axis[idx[1]], attention=False)
                block = _block(sub, dims).to(device)
                fn = lambda: block(x)  # noqa: E731
            else:
                model = VisionTransformer(sub.replace(blocks=[{"heads": 0, "qk_dim": 0, "v_dim": 0, "mlp_dim": 1,
                                                                "attention": False}])).eval().to(device)
                images = torch.randn(B, sub.in_chans, sub.image_size, sub.image_size, device=device)
                fn = _embed_and_head(model, images)
            ms = time_callable(fn, warmup=3, runs=runs, device=device)["median_ms"]
            target = {"attn": attn_ms, "mlp": mlp_ms, "fixed": fixed_ms}[kind]
            target[idx] = ms
    table = LatencyTable(key, [c_axis, h_axis, qk_axis, v_axis], attn_ms, [c_axis, m_axis], mlp_ms,
                         [c_axis], fixed_ms)
    table.probe = probe_ms(table, device)
    table.busy_cores = load.stop()
    return table


def _embed_and_head(model: VisionTransformer, images: torch.Tensor):
    def run() -> torch.Tensor:
        tokens = model.embed(images)
        return model.classify(model.final_norm(tokens))

    return run


__all__ = ["LatencyTable", "device_name", "grid_points", "interpolate"]
