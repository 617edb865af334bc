"""Configuration of the canonical ViT: a shared residual width and per-block dimensions."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from vitrim.errors import ConfigError


@dataclass
class BlockDims:
    """Dimensions of one transformer block.

    ``heads`` attention heads, each with ``qk_dim`` query/key channels and ``v_dim`` value
    channels; ``mlp_dim`` hidden units. ``attention=False`` / ``mlp=False`` mark a removed
    sub-layer (its dims are then 0). ``attn_scale`` fixes the softmax temperature; ``None``
    means ``qk_dim ** -0.5`` (pruning q/k channels keeps the original scale).
    """

    heads: int
    qk_dim: int
    v_dim: int
    mlp_dim: int
    attention: bool = True
    mlp: bool = True
    attn_scale: float | None = None

    def __post_init__(self) -> None:
        if not self.attention:
            self.heads = self.qk_dim = self.v_dim = 0
            self.attn_scale = None
        else:
            for name in ("heads", "qk_dim", "v_dim"):
                if int(getattr(self, name)) < 1:
                    raise ConfigError(
                        f"block has {name}={getattr(self, name)}; an attention sub-layer needs "
                        f"at least 1 (set attention=false to remove it)"
                    )
        if not self.mlp:
            self.mlp_dim = 0
        elif int(self.mlp_dim) < 1:
            raise ConfigError(
                f"block has mlp_dim={self.mlp_dim}; an MLP sub-layer needs at least 1 unit "
                f"(set mlp=false to remove it)"
            )
        if self.attn_scale is not None and not (math.isfinite(self.attn_scale) and self.attn_scale > 0):
            raise ConfigError(f"attn_scale must be a positive finite number, got {self.attn_scale}")

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.qk_dim**-0.5


@dataclass
class ViTConfig:
    """A Vision Transformer whose blocks may each have different dimensions.

    ``mean``/``std``/``class_names`` are preprocessing metadata carried with the model so that
    evaluation and export need no extra flags.
    """

    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    blocks: list[BlockDims] = field(default_factory=list)
    class_token: bool = True
    distill_token: bool = False  # DeiT's distillation token, right after the class token
    distill_head: bool = False  # a second head on the distillation token; logits are the average
    reg_tokens: int = 0  # register tokens, after the class / distillation tokens
    pos_embed_prefix: bool = True  # False: position embeddings cover the patches only (timm no_embed_class)
    fc_norm: bool = False  # True: the final LayerNorm normalises the pooled vector, not the tokens
    qk_norm: bool = False  # LayerNorm over each head's queries and keys (shared across heads)
    pool: str = "cls"  # cls, mean, cls_mean (the two concatenated: DINOv2's head), map (attention pooling)
    pool_heads: int = 0  # pool="map": heads of the pooling attention (SigLIP's probe)
    pool_mlp_dim: int = 0  # pool="map": hidden units of the pooling MLP
    pool_dim: int = 0  # pool="map": width of the pooling attention (0: embed_dim; kept when embed_dim is pruned)
    mlp_act: str = "gelu"  # gelu, gelu_tanh, quick_gelu, silu
    mlp_gated: bool = False  # fc1 emits [gate | up] halves, hidden = act(gate) * up (SwiGLU with silu)
    pre_norm: bool = False  # a LayerNorm on the embedded sequence before the first block (CLIP)
    patch_bias: bool = True
    head_bias: bool = True
    pos_embed_grid: int | None = None  # patch grid the position embedding was stored for, when it differs
    pos_embed_antialias: bool = False  # resize that grid with antialiasing (DINOv2 with registers)
    layer_scale_init: float | None = None
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    drop_path_rate: float = 0.0
    dropout: float = 0.0
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        self.blocks = [b if isinstance(b, BlockDims) else BlockDims(**b) for b in self.blocks]
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if self.pool == "map" and self.pool_dim == 0:
            self.pool_dim = self.embed_dim  # explicit, so that pruning the embedding keeps it
        self.validate()

    def validate(self) -> None:
        positive = ("image_size", "patch_size", "in_chans", "num_classes", "embed_dim")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}"
            )
        if not self.blocks:
            raise ConfigError("a ViT needs at least one block")
        if self.pool not in POOLS:
            raise ConfigError(f"pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if self.mlp_act not in MLP_ACTS:
            raise ConfigError(f"mlp_act must be one of {', '.join(MLP_ACTS)}, got {self.mlp_act!r}")
        if self.pool == "map":
            if self.pool_heads < 1 or self.map_dim % self.pool_heads or self.pool_mlp_dim < 1:
                raise ConfigError(f"pool='map' needs pool_heads dividing pool_dim {self.map_dim} and "
                                  f"pool_mlp_dim >= 1, got {self.pool_heads} and {self.pool_mlp_dim}")
        if self.pool == "cls_mean" and self.fc_norm:
            raise ConfigError("pool='cls_mean' normalises the tokens before pooling; set fc_norm=false")
        if self.pool != "map" and (self.pool_heads or self.pool_mlp_dim or self.pool_dim):
            raise ConfigError("pool_heads / pool_mlp_dim / pool_dim belong to pool='map'; set them to 0 for "
                              "other pools")
        if self.pos_embed_grid is not None and (isinstance(self.pos_embed_grid, bool)
                                                or not isinstance(self.pos_embed_grid, int) or self.pos_embed_grid < 1):
            raise ConfigError(f"pos_embed_grid must be a positive integer or null, got {self.pos_embed_grid!r}")
        if self.distill_token and not self.class_token:
            raise ConfigError("distill_token needs class_token=True (DeiT puts it after the class token)")
        if self.distill_head and not self.distill_token:
            raise ConfigError("distill_head needs distill_token=True")
        if isinstance(self.reg_tokens, bool) or not isinstance(self.reg_tokens, int) or self.reg_tokens < 0:
            raise ConfigError(f"reg_tokens must be a non-negative integer, got {self.reg_tokens!r}")
        if self.pool in ("cls", "cls_mean") and not self.class_token:
            raise ConfigError(f"pool={self.pool!r} needs class_token=True (use pool='mean' or 'map' without one)")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ConfigError(
                f"mean/std need {self.in_chans} values (one per input channel), "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        if any(not (math.isfinite(s) and s > 0) for s in self.std):
            raise ConfigError(f"std values must be positive finite numbers, got {self.std}")
        if not all(math.isfinite(m) for m in self.mean):
            raise ConfigError(f"mean values must be finite numbers, got {self.mean}")
        if not (math.isfinite(self.norm_eps) and self.norm_eps > 0):
            raise ConfigError(f"norm_eps must be a positive finite number, got {self.norm_eps!r}")
        for name in ("drop_path_rate", "dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.layer_scale_init is not None and not math.isfinite(self.layer_scale_init):
            raise ConfigError(f"layer_scale_init must be a finite number or null, got {self.layer_scale_init!r}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ConfigError(
                f"class_names has {len(self.class_names)} entries but num_classes={self.num_classes}"
            )

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.distill_token) + self.reg_tokens

    @property
    def stored_grid(self) -> int:
        """Side of the patch grid the position embedding holds (interpolated to :attr:`grid_size`)."""
        return self.pos_embed_grid or self.grid_size

    @property
    def num_pos_embed(self) -> int:
        """Rows of the position embedding."""
        return self.stored_grid**2 + (self.num_prefix_tokens if self.pos_embed_prefix else 0)

    @property
    def map_dim(self) -> int:
        """Width of the attention-pooling head's attention (pool='map')."""
        return self.pool_dim or self.embed_dim

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled vector the head reads (two embeddings for ``cls_mean``)."""
        return 2 * self.embed_dim if self.pool == "cls_mean" else self.embed_dim

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ViTConfig":
        """A config from its :meth:`to_dict` form, every value type-checked strictly.

        JSON numbers must have the field's type (``192``, not ``"192"``, ``192.0`` or ``true``);
        a config whose model would not fit in this machine's RAM is refused before anything is
        allocated (see :func:`vitrim.limits.check_model_memory`).
        """
        from vitrim.limits import check_model_memory

        if not isinstance(data, dict):
            raise ConfigError(f"a ViT config must be a JSON object, got {_kind(data)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown ViT config keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        for key, value in data.items():
            if key == "blocks":
                _check_blocks(value)
            else:
                _check_value(key, value, CONFIG_TYPES[key])
        config = cls(**data)
        check_model_memory(config)
        return config

    def replace(self, **changes: Any) -> "ViTConfig":
        data = self.to_dict()
        data.update(changes)
        return ViTConfig.from_dict(data)


POOLS = ("cls", "mean", "cls_mean", "map")
MLP_ACTS = ("gelu", "gelu_tanh", "quick_gelu", "silu")

# The JSON type each ViTConfig / BlockDims key takes: int, bool, str, number (int or float),
# number? (a number or null), numbers (a list of numbers), strings? (a list of strings or null).
CONFIG_TYPES = {
    "image_size": "int", "patch_size": "int", "in_chans": "int", "num_classes": "int", "embed_dim": "int",
    "blocks": "blocks", "class_token": "bool", "distill_token": "bool", "distill_head": "bool",
    "reg_tokens": "int", "pos_embed_prefix": "bool", "fc_norm": "bool", "qk_norm": "bool", "pool": "str",
    "pool_heads": "int", "pool_mlp_dim": "int", "pool_dim": "int", "mlp_act": "str", "mlp_gated": "bool", "pre_norm": "bool",
    "patch_bias": "bool", "head_bias": "bool", "pos_embed_grid": "int?", "pos_embed_antialias": "bool",
    "layer_scale_init": "number?", "qkv_bias": "bool", "norm_eps": "number", "drop_path_rate": "number",
    "dropout": "number", "mean": "numbers", "std": "numbers", "class_names": "strings?",
}
BLOCK_TYPES = {"heads": "int", "qk_dim": "int", "v_dim": "int", "mlp_dim": "int", "attention": "bool",
               "mlp": "bool", "attn_scale": "number?"}
BLOCK_REQUIRED = ("heads", "qk_dim", "v_dim", "mlp_dim")
_EXPECTED = {"int": "an integer", "bool": "true or false", "str": "a string", "number": "a number",
             "number?": "a number or null", "int?": "an integer or null", "numbers": "a list of numbers",
             "strings?": "a list of strings or null"}


def _kind(value: Any) -> str:
    """The JSON kind of ``value`` for error messages."""
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "a list",
             tuple: "a list", dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fits(value: Any, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "number":
        return _is_number(value)
    if kind == "int?":
        return value is None or (isinstance(value, int) and not isinstance(value, bool))
    if kind == "number?":
        return value is None or _is_number(value)
    if kind == "numbers":
        return isinstance(value, (list, tuple)) and all(_is_number(v) for v in value)
    if kind == "strings?":
        return value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    raise AssertionError(f"unknown config type {kind}")


def _hint(value: Any, kind: str) -> str:
    """How to write ``value`` as ``kind``, when there is an obvious way."""
    if kind == "int" and isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return f"; write it as a JSON number without quotes: {int(value)}"
    if kind == "int" and isinstance(value, float) and value.is_integer():
        return f"; write it without a fraction: {int(value)}"
    if kind == "bool":
        return "; write true or false (a JSON boolean)"
    if kind == "int":
        return "; write a whole number such as 192"
    if kind == "numbers" and isinstance(value, (list, tuple)):
        bad = next(v for v in value if not _is_number(v))
        return f" (item {_show(bad)} is {_kind(bad)}); write e.g. [0.5, 0.5, 0.5]"
    if kind == "numbers":
        return "; write a list such as [0.5, 0.5, 0.5]"
    return ""


def _show(value: Any, limit: int = 60) -> str:
    """``value`` as JSON would write it, shortened."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_value(key: str, value: Any, kind: str) -> None:
    if not _fits(value, kind):
        raise ConfigError(f"config key {key!r} must be {_EXPECTED[kind]}, got {_show(value)} "
                          f"({_kind(value)}){_hint(value, kind)}")


def _check_blocks(blocks: Any) -> None:
    """Every block a JSON object of known keys with values of the right type."""
    if not isinstance(blocks, list):
        raise ConfigError(f"config key 'blocks' must be a list of block objects, got {_kind(blocks)}")
    for i, block in enumerate(blocks):
        if isinstance(block, BlockDims):
            block = dataclasses.asdict(block)
        if not isinstance(block, dict):
            raise ConfigError(f"config key 'blocks[{i}]' must be an object with {', '.join(BLOCK_TYPES)}, "
                              f"got {_kind(block)}")
        unknown = sorted(set(block) - set(BLOCK_TYPES))
        if unknown:
            raise ConfigError(f"config key 'blocks[{i}]' has unknown keys {', '.join(unknown)} "
                              f"(known: {', '.join(BLOCK_TYPES)})")
        missing = [k for k in BLOCK_REQUIRED if k not in block]
        if missing:
            raise ConfigError(f"config key 'blocks[{i}]' lacks {', '.join(missing)}; every block names "
                              f"{', '.join(BLOCK_REQUIRED)}")
        for key, value in block.items():
            _check_value(f"blocks[{i}].{key}", value, BLOCK_TYPES[key])
            if BLOCK_TYPES[key] == "int" and value < 0:
                raise ConfigError(f"config key 'blocks[{i}].{key}' must not be negative, got {value}")


def uniform_config(
    depth: int,
    embed_dim: int,
    heads: int,
    mlp_ratio: float = 4.0,
    head_dim: int | None = None,
    **kwargs: Any,
) -> ViTConfig:
    """A standard ViT: every block has the same dims (``head_dim`` defaults to embed/heads)."""
    if heads < 1 or embed_dim % heads and head_dim is None:
        raise ConfigError(f"embed_dim {embed_dim} is not divisible by heads {heads}")
    head_dim = head_dim or embed_dim // heads
    blocks = [
        BlockDims(heads=heads, qk_dim=head_dim, v_dim=head_dim, mlp_dim=int(embed_dim * mlp_ratio))
        for _ in range(depth)
    ]
    return ViTConfig(embed_dim=embed_dim, blocks=blocks, **kwargs)
