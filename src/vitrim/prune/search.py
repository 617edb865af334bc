"""Budgeted search of the intrinsic dimensions: a global greedy over every structure.

Each step removes the candidate that costs the least saliency per unit of cost saved —
a head, a chunk of ``round_to`` query/key or value channels per head, a chunk of MLP units or
embedding channels, or a whole sub-layer — until the model's cost is within the budget.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch

from vitrim.errors import ConfigError
from vitrim.models.config import BlockDims, ViTConfig
from vitrim.prune.cost import CostModel
from vitrim.prune.plan import BlockPlan, PrunePlan

STRUCTURES = ("heads", "qk", "v", "mlp", "embed", "attn_layer", "mlp_layer")


def module_of(kind: str, block: int | None) -> str:
    """The module name a structure lives in, for ``exclude`` patterns."""
    if kind == "embed":
        return "embed"
    return f"blocks.{block}.{'attn' if kind in ('heads', 'qk', 'v', 'attn_layer') else 'mlp'}"


@dataclass
class BlockState:
    heads: list[int]  # kept, least salient first
    qk_order: list[list[int]]  # per original head: its channels, least salient first
    v_order: list[list[int]]
    qk_keep: int
    v_keep: int
    mlp_order: list[int]
    mlp_keep: int
    attention: bool
    mlp_on: bool
    scale: float | None

    def dims(self) -> BlockDims:
        if not self.attention and not self.mlp_on:
            return BlockDims(0, 0, 0, 0, attention=False, mlp=False)
        return BlockDims(len(self.heads) if self.attention else 0, self.qk_keep if self.attention else 0,
                         self.v_keep if self.attention else 0, self.mlp_keep if self.mlp_on else 0,
                         attention=self.attention, mlp=self.mlp_on)


@dataclass
class Candidate:
    kind: str
    block: int | None
    saliency: float
    cost_after: float
    apply: object = field(repr=False, default=None)


def _ascending(scores: torch.Tensor) -> list[int]:
    return torch.argsort(scores.double(), stable=True).tolist()


def _next_keep(current: int, step: int) -> int:
    """The next smaller multiple of ``step`` (or 0 when none is left)."""
    return ((current - 1) // step) * step


class Search:
    """Greedy removal on a copy of the configuration; ``plan()`` gives the kept indices."""

    def __init__(self, cfg: ViTConfig, scores: dict[str, torch.Tensor], cost: CostModel, *,
                 structures: tuple[str, ...] = STRUCTURES, exclude: tuple[str, ...] = (),
                 round_to: int = 8) -> None:
        unknown = sorted(set(structures) - set(STRUCTURES))
        if unknown:
            raise ConfigError(f"unknown structure kind(s) {', '.join(unknown)}; choose from {', '.join(STRUCTURES)}")
        if round_to < 1:
            raise ConfigError(f"round_to must be positive, got {round_to}")
        self.cfg, self.scores, self.cost = cfg, scores, cost
        self.structures, self.exclude, self.round_to = set(structures), tuple(exclude), round_to
        self.embed_order = _ascending(scores["embed"])
        self.embed_keep = cfg.embed_dim
        self.blocks: list[BlockState] = []
        for i, d in enumerate(cfg.blocks):
            heads = _ascending(scores[f"{i}.heads"]) if d.attention else []
            self.blocks.append(BlockState(
                heads=heads,
                qk_order=[_ascending(scores[f"{i}.qk"][h]) for h in range(d.heads)],
                v_order=[_ascending(scores[f"{i}.v"][h]) for h in range(d.heads)],
                qk_keep=d.qk_dim, v_keep=d.v_dim,
                mlp_order=_ascending(scores[f"{i}.mlp"]) if d.mlp else [], mlp_keep=d.mlp_dim,
                attention=d.attention, mlp_on=d.mlp, scale=d.scale if d.attention else None))

    def allowed(self, kind: str, block: int | None) -> bool:
        if kind not in self.structures:
            return False
        name = module_of(kind, block)
        return not any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude)

    def config(self) -> ViTConfig:
        blocks = []
        for b in self.blocks:
            d = b.dims()
            blocks.append({"heads": d.heads, "qk_dim": d.qk_dim, "v_dim": d.v_dim, "mlp_dim": d.mlp_dim,
                           "attention": d.attention, "mlp": d.mlp, "attn_scale": b.scale if d.attention else None})
        return self.cfg.replace(embed_dim=self.embed_keep, blocks=blocks)

    def total_cost(self) -> float:
        return self.cost.total(self.config())

    # -- candidates -------------------------------------------------------------------------
    def _block_cost_with(self, i: int, **changes) -> float:
        b = self.blocks[i]
        d = b.dims()
        values = {"heads": d.heads, "qk_dim": d.qk_dim, "v_dim": d.v_dim, "mlp_dim": d.mlp_dim,
                  "attention": d.attention, "mlp": d.mlp}
        values.update(changes)
        if not values["attention"]:
            values.update(heads=0, qk_dim=0, v_dim=0)
        if not values["mlp"]:
            values["mlp_dim"] = 0
        if not values["attention"] and not values["mlp"]:
            new = BlockDims(0, 0, 0, 0, attention=False, mlp=False)
        else:
            new = BlockDims(**values)
        return self.cost.block(self.embed_keep, new, self.cfg.num_tokens, self.cfg) - \
            self.cost.block(self.embed_keep, d, self.cfg.num_tokens, self.cfg)

    def candidates(self, current: float) -> list[Candidate]:
        out: list[Candidate] = []
        s = self.scores
        for i, b in enumerate(self.blocks):
            if b.attention:
                if self.allowed("heads", i) and len(b.heads) > 1:
                    h = b.heads[0]
                    out.append(Candidate("heads", i, float(s[f"{i}.heads"][h]),
                                         current + self._block_cost_with(i, heads=len(b.heads) - 1),
                                         lambda b=b: b.heads.pop(0)))
                for kind, keep_attr, order_attr, dim_key in (("qk", "qk_keep", "qk_order", "qk_dim"),
                                                              ("v", "v_keep", "v_order", "v_dim")):
                    keep = getattr(b, keep_attr)
                    new_keep = _next_keep(keep, self.round_to)
                    if self.allowed(kind, i) and new_keep >= 1:
                        order = getattr(b, order_attr)
                        sal = sum(float(s[f"{i}.{kind}"][h][c]) for h in b.heads
                                  for c in order[h][len(order[h]) - keep : len(order[h]) - new_keep])
                        out.append(Candidate(kind, i, sal, current + self._block_cost_with(i, **{dim_key: new_keep}),
                                             lambda b=b, a=keep_attr, n=new_keep: setattr(b, a, n)))
                if self.allowed("attn_layer", i) and (b.mlp_on or self._others_alive(i)):
                    out.append(Candidate("attn_layer", i, float(s[f"{i}.attn_layer"]),
                                         current + self._block_cost_with(i, attention=False),
                                         lambda b=b: setattr(b, "attention", False)))
            if b.mlp_on:
                new_keep = _next_keep(b.mlp_keep, self.round_to)
                if self.allowed("mlp", i) and new_keep >= 1:
                    removed = b.mlp_order[len(b.mlp_order) - b.mlp_keep : len(b.mlp_order) - new_keep]
                    out.append(Candidate("mlp", i, float(s[f"{i}.mlp"][removed].sum()),
                                         current + self._block_cost_with(i, mlp_dim=new_keep),
                                         lambda b=b, n=new_keep: setattr(b, "mlp_keep", n)))
                if self.allowed("mlp_layer", i) and (b.attention or self._others_alive(i)):
                    out.append(Candidate("mlp_layer", i, float(s[f"{i}.mlp_layer"]),
                                         current + self._block_cost_with(i, mlp=False),
                                         lambda b=b: setattr(b, "mlp_on", False)))
        new_keep = _next_keep(self.embed_keep, self.round_to)
        if self.allowed("embed", None) and new_keep >= 1:
            removed = self.embed_order[len(self.embed_order) - self.embed_keep : len(self.embed_order) - new_keep]
            keep_before = self.embed_keep
            self.embed_keep = new_keep
            after = self.total_cost()
            self.embed_keep = keep_before
            out.append(Candidate("embed", None, float(s["embed"][removed].sum()), after,
                                 lambda n=new_keep: setattr(self, "embed_keep", n)))
        return out

    def _others_alive(self, i: int) -> bool:
        """Some other sub-layer stays, so removing one from block ``i`` leaves a working model."""
        return any((b.attention or b.mlp_on) for j, b in enumerate(self.blocks) if j != i)

    # -- the search -------------------------------------------------------------------------
    def run(self, target_cost: float, tolerance: float = 0.01, on_step=None) -> list[Candidate]:
        """Remove structures until cost <= target; never below target * (1 - tolerance) if avoidable."""
        removed: list[Candidate] = []
        current = self.total_cost()
        floor = target_cost * (1 - tolerance)
        while current > target_cost:
            cands = [c for c in self.candidates(current) if c.cost_after < current]
            if not cands:
                raise ConfigError(
                    f"the budget cannot be met: the smallest model the allowed structures leave costs "
                    f"{current:.4g} {self.cost.metric}, the target is {target_cost:.4g}; allow more structure kinds "
                    f"(--structures), exclude fewer modules, or use a larger target")
            safe = [c for c in cands if c.cost_after >= floor]
            if safe:
                best = min(safe, key=lambda c: c.saliency / (current - c.cost_after))
            else:
                best = max(cands, key=lambda c: c.cost_after)
            best.apply()
            current = self.total_cost()
            removed.append(best)
            if on_step is not None:
                on_step(best, current)
        return removed

    def plan(self) -> PrunePlan:
        embed = sorted(self.embed_order[len(self.embed_order) - self.embed_keep :])
        blocks = []
        for b in self.blocks:
            heads = sorted(b.heads) if b.attention else []
            qk = [sorted(b.qk_order[h][len(b.qk_order[h]) - b.qk_keep :]) for h in heads]
            v = [sorted(b.v_order[h][len(b.v_order[h]) - b.v_keep :]) for h in heads]
            mlp = sorted(b.mlp_order[len(b.mlp_order) - b.mlp_keep :]) if b.mlp_on else []
            blocks.append(BlockPlan(heads, qk, v, mlp, b.attention, b.mlp_on))
        return PrunePlan(embed, blocks)
