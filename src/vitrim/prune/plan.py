"""A pruning plan: which heads, channels and units of the current model are kept.

Indices refer to the model the plan was made for. Every kept head of a block keeps the same
number of query/key channels and of value channels (the canonical ViT has one ``qk_dim`` and
one ``v_dim`` per block), though not necessarily the same channel indices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vitrim.errors import ConfigError
from vitrim.models.config import BlockDims, ViTConfig


@dataclass
class BlockPlan:
    heads: list[int]
    qk: list[list[int]]  # per kept head, kept query/key channel indices
    v: list[list[int]]  # per kept head, kept value channel indices
    mlp: list[int]
    attention: bool = True
    mlp_on: bool = True

    def __post_init__(self) -> None:
        if self.attention:
            if not self.heads:
                raise ConfigError("a kept attention sub-layer needs at least one head")
            if len(self.qk) != len(self.heads) or len(self.v) != len(self.heads):
                raise ConfigError("qk/v channel lists must be given for every kept head")
            if len({len(c) for c in self.qk}) != 1 or len({len(c) for c in self.v}) != 1:
                raise ConfigError("every kept head of a block must keep the same number of qk and v channels")
            if not self.qk[0] or not self.v[0]:
                raise ConfigError("a kept head needs at least one qk and one v channel")
        if self.mlp_on and not self.mlp:
            raise ConfigError("a kept MLP sub-layer needs at least one unit")

    def dims(self, scale: float | None) -> BlockDims:
        if not self.attention and not self.mlp_on:
            return BlockDims(0, 0, 0, 0, attention=False, mlp=False)
        return BlockDims(
            heads=len(self.heads) if self.attention else 0,
            qk_dim=len(self.qk[0]) if self.attention else 0,
            v_dim=len(self.v[0]) if self.attention else 0,
            mlp_dim=len(self.mlp) if self.mlp_on else 0,
            attention=self.attention, mlp=self.mlp_on,
            attn_scale=scale if self.attention else None,
        )


@dataclass
class PrunePlan:
    embed: list[int]
    blocks: list[BlockPlan] = field(default_factory=list)

    @classmethod
    def keep_all(cls, cfg: ViTConfig) -> "PrunePlan":
        blocks = []
        for d in cfg.blocks:
            heads = list(range(d.heads))
            blocks.append(BlockPlan(heads, [list(range(d.qk_dim)) for _ in heads],
                                    [list(range(d.v_dim)) for _ in heads], list(range(d.mlp_dim)),
                                    d.attention, d.mlp))
        return cls(list(range(cfg.embed_dim)), blocks)

    def pruned_config(self, cfg: ViTConfig) -> ViTConfig:
        """The configuration of the model this plan leaves (original softmax scales kept)."""
        if not self.embed:
            raise ConfigError("the plan removes every embedding channel")
        blocks = [bp.dims(_kept_scale(bp, d)) for bp, d in zip(self.blocks, cfg.blocks)]
        return cfg.replace(embed_dim=len(self.embed), blocks=[_as_dict(b) for b in blocks])


def _kept_scale(bp: BlockPlan, d: BlockDims) -> float | None:
    """The original softmax scale, made explicit only once the query/key width changes."""
    if not d.attention or (d.attn_scale is None and bp.attention and len(bp.qk[0]) == d.qk_dim):
        return d.attn_scale
    return d.scale


def _as_dict(b: BlockDims) -> dict:
    return {"heads": b.heads, "qk_dim": b.qk_dim, "v_dim": b.v_dim, "mlp_dim": b.mlp_dim,
            "attention": b.attention, "mlp": b.mlp, "attn_scale": b.attn_scale}
