"""Size bounds: a model or batch too large for this machine is refused before anything is allocated.

Estimates are in fp32 bytes. Parameters are counted exactly for vitrim's ViT; activations are a
rough upper bound of what one forward pass keeps alive: a few ``(batch, tokens, width)`` tensors
plus the attention scores and their softmax, ``(batch, heads, tokens, tokens)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitrim.errors import ConfigError

FLOAT_BYTES = 4
ACTIVATION_COPIES = 4  # live (B, N, width) tensors in a block: input, residual, hidden, GELU output
ATTENTION_COPIES = 2  # attention scores and their softmax
MAX_TOKENS = 1 << 17  # twice a 1024x1024 image in 4x4 patches
MAX_WIDTH = 1 << 20  # any one width: embed_dim, mlp_dim, heads, per-head dims, num_classes, in_chans
MAX_DEPTH = 4096
FALLBACK_RAM = 8 << 30  # assumed when the system does not say


@dataclass
class ModelShape:
    """The sizes the estimates read, for a model described by something other than a ``ViTConfig``.

    Any ``ViTConfig`` works where a ``ModelShape`` does; this one is for other families' configs
    (every block alike, position embeddings over every token).
    """

    image_size: int
    patch_size: int
    in_chans: int
    embed_dim: int
    blocks: list[Any]  # BlockDims, typed loosely so that limits imports no model module
    num_classes: int
    num_prefix_tokens: int = 1
    qkv_bias: bool = True
    qk_norm: bool = False
    layer_scale_init: float | None = None
    distill_head: bool = False

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + self.num_prefix_tokens

    @property
    def num_pos_embed(self) -> int:
        return self.num_tokens


def physical_ram() -> int:
    """This machine's physical memory in bytes (page size x pages; 8 GiB if the system does not say)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if ram > 0:
            return int(ram)
    except (AttributeError, ValueError, OSError):
        pass
    return _meminfo_total() or FALLBACK_RAM


def _meminfo_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def human_bytes(count: float) -> str:
    """``1.5 GB``-style text (powers of 1024)."""
    if count < 1024:
        return f"{count:.0f} B"
    for unit in ("KB", "MB", "GB", "TB", "PB"):
        count /= 1024
        if count < 1024:
            break
    return f"{count:.1f} {unit}"


def parameter_count(config: Any) -> int:
    """Parameters of the vitrim ViT ``config`` describes, counted without building it."""
    return sum(_parameter_parts(config).values())


def _parameter_parts(config: Any) -> dict[str, int]:
    """Parameter counts keyed by the config key that sizes them."""
    C, T = config.embed_dim, config.num_pos_embed
    scale = C if config.layer_scale_init is not None else 0
    embed = config.in_chans * config.patch_size**2 * C + C + config.num_prefix_tokens * C + 2 * C
    attention = mlp = 0
    for d in config.blocks:
        if d.attention:
            inner = d.heads * (2 * d.qk_dim + d.v_dim)
            attention += 2 * C + C * inner + (inner if config.qkv_bias else 0) + d.heads * d.v_dim * C + C + scale
            attention += 4 * d.qk_dim if config.qk_norm else 0
        if d.mlp:
            mlp += 2 * C + 2 * C * d.mlp_dim + d.mlp_dim + C + scale
    heads = 2 if config.distill_head else 1
    return {"embed_dim": embed + attention, "mlp_dim": mlp, "num_classes": heads * (C + 1) * config.num_classes,
            "image_size": T * C}


def activation_bytes(config: Any, batch: int) -> int:
    """Rough peak activation bytes of one forward pass on ``batch`` images.

    ``config`` is a vitrim ``ViTConfig``; anything else with ``image_size`` and ``in_chans``
    (e.g. an ONNX model's preprocessing record) is sized by its input alone.
    """
    if not hasattr(config, "blocks"):
        return batch * config.in_chans * config.image_size**2 * FLOAT_BYTES * ACTIVATION_COPIES
    T = config.num_tokens
    width = max([config.embed_dim] + [max(d.mlp_dim, d.heads * (2 * d.qk_dim + d.v_dim)) for d in config.blocks])
    heads = max((d.heads for d in config.blocks), default=0)
    dense = batch * T * width * FLOAT_BYTES * ACTIVATION_COPIES
    attention = batch * heads * T * T * FLOAT_BYTES * ATTENTION_COPIES
    ends = batch * (config.in_chans * config.image_size**2 + config.num_classes) * FLOAT_BYTES  # pixels, logits
    return dense + attention + ends


def check_config_bounds(config: Any, keys: Mapping[str, str] | None = None, source: str | None = None) -> None:
    """A :class:`ConfigError` naming the key when one value is beyond any model vitrim can run.

    ``keys`` renames vitrim's keys (``embed_dim``...) to the ones the file uses (``hidden_size``...).
    """
    name, at = _namer(keys), f"{source}: " if source else ""
    if config.depth > MAX_DEPTH:
        raise ConfigError(f"{at}{name('blocks')} has {config.depth} blocks, more than vitrim runs "
                          f"({MAX_DEPTH}); use fewer blocks")
    if config.num_tokens > MAX_TOKENS:
        raise ConfigError(f"{at}{name('image_size')}={config.image_size} with {name('patch_size')}="
                          f"{config.patch_size} gives {config.num_tokens} tokens, more than vitrim runs "
                          f"({MAX_TOKENS}); use a smaller image_size or a larger patch_size")
    widths = {"embed_dim": config.embed_dim, "num_classes": config.num_classes, "in_chans": config.in_chans}
    for d in config.blocks:
        for key in ("heads", "qk_dim", "v_dim", "mlp_dim"):
            widths.setdefault(key, 0)
            widths[key] = max(widths[key], getattr(d, key))
    for key, value in widths.items():
        if value > MAX_WIDTH:
            raise ConfigError(f"{at}{name(key)}={value} is beyond any model vitrim runs (at most "
                              f"{MAX_WIDTH}); use a smaller {name(key)}")


def check_model_memory(config: Any, keys: Mapping[str, str] | None = None, source: str | None = None,
                       ram: int | None = None) -> None:
    """Refuse (:class:`ConfigError`) a config whose parameters plus one image's activations exceed RAM.

    Checks :func:`check_config_bounds` first. The error names the key behind the largest part
    (``keys`` maps vitrim's key names to the file's) and the machine's RAM.
    """
    check_config_bounds(config, keys, source)
    ram = physical_ram() if ram is None else ram
    parts = {key: count * FLOAT_BYTES for key, count in _parameter_parts(config).items()}
    parts["image_size"] += activation_bytes(config, 1)
    total = sum(parts.values())
    if total <= ram:
        return
    name, at = _namer(keys), f"{source}: " if source else ""
    worst = max(parts, key=parts.__getitem__)
    values = {"embed_dim": config.embed_dim, "mlp_dim": max((d.mlp_dim for d in config.blocks), default=0),
              "num_classes": config.num_classes,
              "image_size": f"{config.image_size} ({name('patch_size')}={config.patch_size}, "
                            f"{config.num_tokens} tokens)"}
    raise ConfigError(f"{at}the model needs about {human_bytes(total)} (parameters and one image's "
                      f"activations), more than this machine's {human_bytes(ram)} of RAM; the largest part "
                      f"comes from {name(worst)}={values[worst]}; reduce it")


def check_batch_memory(config: Any, batch: int, what: str) -> None:
    """Refuse (:class:`ConfigError` naming ``what``, e.g. ``"--batch 100000"``) a batch too large for RAM.

    ``config`` is the model's ``ViTConfig`` (or any record with ``image_size`` and ``in_chans``);
    the estimate is the parameters plus :func:`activation_bytes` for ``batch`` images.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"{what}: a batch size must be a positive integer, got {batch!r}")
    ram = physical_ram()
    params = parameter_count(config) * FLOAT_BYTES if hasattr(config, "blocks") else 0
    need = params + activation_bytes(config, batch)
    if need <= ram:
        return
    per_image = max(activation_bytes(config, 1), 1)
    fits = max((ram - params) // per_image, 0)
    fix = f"use a batch of at most {fits}" if fits >= 1 else "even one image does not fit; use a smaller model"
    raise ConfigError(f"{what}: {batch} images need about {human_bytes(need)} of memory (activations "
                      f"{human_bytes(need - params)}), more than this machine's {human_bytes(ram)} of RAM; {fix}")


def _namer(keys: Mapping[str, str] | None) -> Callable[[str], str]:
    keys = keys or {}
    return lambda key: keys.get(key, key)
