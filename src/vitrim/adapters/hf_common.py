"""What every Hugging Face family shares: removed sub-layers, a quiet ``transformers``, and one
safetensors-only loader for ``save_pretrained`` directories.

Only safetensors weights are read, and only from the directory itself (``local_files_only``): a
``pytorch_model.bin`` is pickle and is refused, and so is a ``model.safetensors.index.json`` naming
any file but a ``.safetensors`` shard in the directory (transformers would unpickle a ``.bin`` shard
even with ``use_safetensors=True``). The family comes from ``config.json``'s ``architectures`` class
(else its ``model_type``, and the family picks the class from the weight names); the family's
``hf_check_config`` type- and memory-checks the sizes before transformers builds anything. Weights
that do not match the config are an error, never a silent random re-initialisation.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitrim.errors import ConfigError, ModelFileError

CONFIG_FILE = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")
SAFE_FIX = "save the model with save_pretrained(..., safe_serialization=True)"
# transformers' ViTConfig defaults, used for the keys a config.json leaves out.
VIT_SIZE_DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                     "intermediate_size": 3072, "image_size": 224, "patch_size": 16, "num_channels": 3}
# vitrim's name for each size -> the Hugging Face config key, for error messages.
VIT_KEY_NAMES = {"embed_dim": "hidden_size", "blocks": "num_hidden_layers", "heads": "num_attention_heads",
                 "qk_dim": "hidden_size / num_attention_heads", "v_dim": "hidden_size / num_attention_heads",
                 "mlp_dim": "intermediate_size", "image_size": "image_size", "patch_size": "patch_size",
                 "in_chans": "num_channels", "num_classes": "id2label"}


# What every Hugging Face family stores to rebuild its model: the class and its config.
HF_METADATA_KEYS = {"hf_class": ((str,), True), "hf_config": ((dict,), True)}


def hf_metadata(model: nn.Module) -> dict[str, Any]:
    """Class and config: what a Hugging Face family's ``from_canonical`` needs (JSON-serialisable)."""
    return {"hf_class": type(model).__name__, "hf_config": model.config.to_dict()}


def hf_metadata_check(check_config: Callable[[dict[str, Any], Any], None],
                      keys: Mapping[str, Any] = HF_METADATA_KEYS) -> Callable[[dict[str, Any], int], None]:
    """A family's ``check_metadata``: ``keys`` present and typed, then its ``config.json`` check on the
    saved ``hf_config``."""
    from vitrim.adapters.registry import check_metadata_keys

    def check(meta: dict[str, Any], num_classes: int) -> None:
        check_metadata_keys(meta, dict(keys))
        check_config(meta["hf_config"], "the model config's \"hf_config\"")

    return check


class RemovedAttention(nn.Module):
    """Stands in for a pruned-away HF attention: contributes nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


class RemovedMlp(nn.Module):
    """Stands in for a pruned-away HF MLP: contributes nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars or load reports on the console while vitrim loads a model."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def require_transformers() -> Any:
    """The ``transformers`` module; a :class:`ConfigError` naming the install command without it."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("Hugging Face models need transformers: pip install 'vitrim[hf]'") from None
    return transformers


def is_hf_config(data: Any) -> bool:
    """True for a parsed ``config.json`` written by ``transformers`` (it names a ``model_type``)."""
    return isinstance(data, dict) and "model_type" in data and data.get("format") != "vitrim"


def weight_names(directory: Path) -> list[str]:
    """Tensor names in the directory's safetensors weights (one file, or shards with an index).

    Every file the index names must be a ``.safetensors`` file in ``directory``: transformers
    would unpickle a ``pytorch_model.bin`` named there even when told to load safetensors only.
    """
    from safetensors import SafetensorError, safe_open

    index, single = directory / SAFETENSORS_INDEX, directory / SAFETENSORS
    if index.is_file():
        return list(_index_weight_map(directory, index))
    if not single.is_file():
        pickled = [name for name in PICKLED if (directory / name).is_file()]
        found = f" (it has {pickled[0]}, a pickle file vitrim does not load)" if pickled else ""
        raise ModelFileError(f"{directory} has no {SAFETENSORS}{found}; {SAFE_FIX}")
    try:
        with safe_open(str(single), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as exc:
        raise ModelFileError(f"{single} is not a valid safetensors file ({exc})") from None


def _index_weight_map(directory: Path, index: Path) -> dict[str, str]:
    """The index's ``weight_map``, checked to name only safetensors shards present in ``directory``."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ModelFileError(f"{index} is not a valid safetensors index ({exc}); {SAFE_FIX}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelFileError(f"{index}: \"weight_map\" must map tensor names to file names; {SAFE_FIX}")
    for shard in sorted(set(weight_map.values())):
        if not shard.endswith(".safetensors"):
            raise ModelFileError(f"{index} names {shard!r}, not a .safetensors file (vitrim loads no pickle "
                                 f"weights); {SAFE_FIX}")
        path = directory / shard
        if Path(shard).name != shard or path.resolve().parent != directory.resolve():
            raise ModelFileError(f"{index} names {shard!r}, outside {directory}; the shards of a model belong "
                                 f"in its directory ({SAFE_FIX})")
        if not path.is_file():
            raise ModelFileError(f"{index} names {shard!r}, which {directory} lacks; copy the whole "
                                 f"directory, or {SAFE_FIX}")
    return weight_map


def _positive_sizes(config: Mapping[str, Any], defaults: Mapping[str, int], source: Path | str) -> dict[str, int]:
    """Each size key of ``defaults`` read from ``config`` (a pair for image/patch size allowed), checked."""
    from vitrim.limits import MAX_DEPTH, MAX_WIDTH

    sizes: dict[str, int] = {}
    for key, default in defaults.items():
        value = config.get(key, default)
        items = value if key in ("image_size", "patch_size") and isinstance(value, list) and len(value) == 2 \
            else [value]
        for item in items:
            if isinstance(item, bool) or not isinstance(item, int) or item < 1:
                raise ModelFileError(f"{source}: {key!r} must be a positive integer, got {value!r}; "
                                     f"write it as a JSON number such as {default}")
        bound = MAX_DEPTH if key == "num_hidden_layers" else MAX_WIDTH
        if max(items) > bound:
            raise ConfigError(f"{source}: {key}={value!r} is beyond any model vitrim runs (at most {bound}); "
                              f"use a smaller {key}")
        sizes[key] = min(items) if key == "patch_size" else max(items)
    return sizes


def _class_count(config: Mapping[str, Any], source: Path | str) -> int:
    from vitrim.limits import MAX_WIDTH

    labels = config.get("id2label")
    if labels is not None and not isinstance(labels, dict):
        raise ModelFileError(f"{source}: 'id2label' must be an object mapping class indices to names, "
                             f"got {labels!r}")
    count = len(labels) if labels else config.get("num_labels", 2)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ModelFileError(f"{source}: 'num_labels' must be a positive integer, got {count!r}")
    if count > MAX_WIDTH:
        raise ConfigError(f"{source}: {count} classes is beyond any model vitrim runs (at most {MAX_WIDTH})")
    return count


def check_hf_config(config: Mapping[str, Any], source: Path | str, *,
                    defaults: Mapping[str, int] = VIT_SIZE_DEFAULTS, key_names: Mapping[str, str] = VIT_KEY_NAMES,
                    num_prefix_tokens: int = 1, labels: bool = True) -> None:
    """Type- and size-check the ``config.json`` fields transformers sizes a ViT-shaped model from.

    ``defaults`` maps the size keys (``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
    ``intermediate_size``, ``image_size``, ``patch_size``, ``num_channels``) to the config class's
    defaults; ``labels`` also checks ``id2label`` / ``num_labels``. A :class:`ModelFileError` names a
    key whose value is not a positive integer; a :class:`ConfigError` (from
    :func:`vitrim.limits.check_model_memory`) refuses a model too large for this machine's RAM, both
    before transformers allocates anything. Pass a vision tower's sub-config for a multi-modal model.
    """
    from vitrim.limits import ModelShape, check_model_memory
    from vitrim.models import BlockDims

    sizes = _positive_sizes(config, defaults, source)
    count = _class_count(config, source) if labels else 1
    heads = sizes["num_attention_heads"]
    head_dim = max(sizes["hidden_size"] // heads, 1)
    block = BlockDims(heads=heads, qk_dim=head_dim, v_dim=head_dim, mlp_dim=sizes["intermediate_size"])
    shape = ModelShape(image_size=sizes["image_size"], patch_size=sizes["patch_size"],
                       in_chans=sizes["num_channels"], embed_dim=sizes["hidden_size"],
                       blocks=[block] * sizes["num_hidden_layers"], num_classes=count,
                       num_prefix_tokens=num_prefix_tokens)
    check_model_memory(shape, keys=dict(key_names), source=str(source))


def require_complete(info: Mapping[str, Any], directory: Path) -> None:
    """A :class:`ModelFileError` unless every weight matched the model ``config.json`` describes."""
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(kind) or ())
        if keys:
            problems.append(f"{kind.split('_')[0]} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}")
    if problems:
        raise ModelFileError(f"{directory}: the weights do not match {CONFIG_FILE} ({'; '.join(problems)}); the "
                             f"files come from different models (a pruned model saved with save_pretrained "
                             f"cannot be described by one config: save it with vitrim.save)")


def _mlp_linears(mlp: nn.Module) -> tuple[list[nn.Linear], nn.Linear]:
    """(the layers that make fc1 — [gate, up] for a gated MLP —, the layer that is fc2)."""
    if hasattr(mlp, "gate_proj"):
        return [mlp.gate_proj, mlp.up_proj], mlp.down_proj
    return [mlp.fc1], mlp.fc2


def block_dims(attention: nn.Module, mlp: nn.Module, scale: str = "scaling") -> Any:
    """The canonical :class:`~vitrim.models.BlockDims` of an HF layer with separate q/k/v projections,
    one ``head_dim`` and the softmax scale in attribute ``scale``; a removed sub-layer has none."""
    from vitrim.models import BlockDims

    has_attn, has_mlp = not isinstance(attention, RemovedAttention), not isinstance(mlp, RemovedMlp)
    if has_attn:
        head_dim = attention.head_dim
        dims = dict(heads=attention.q_proj.out_features // head_dim, qk_dim=head_dim, v_dim=head_dim,
                    attn_scale=float(getattr(attention, scale)))
    else:
        dims = dict(heads=0, qk_dim=0, v_dim=0, attention=False)
    return BlockDims(mlp_dim=_mlp_linears(mlp)[1].in_features if has_mlp else 0, mlp=has_mlp, **dims)


def check_one_head_dim(cfg: Any, family: str) -> None:
    """A :class:`ConfigError` for a canonical block whose query/key and value head widths differ."""
    for i, d in enumerate(cfg.blocks):
        if d.attention and d.qk_dim != d.v_dim:
            raise ConfigError(f"block {i} has qk_dim {d.qk_dim} != v_dim {d.v_dim}; {family} attention uses one "
                              f"head_dim for queries, keys and values (prune heads whole)")


def resize_block(attention: nn.Module, mlp: nn.Module, dims: Any, cfg: Any, *, out_proj: str, scale: str,
                 heads: str) -> tuple[nn.Module, nn.Module]:
    """The layer's attention and MLP with the canonical block's widths (new linears, same classes;
    a removed sub-layer becomes :class:`RemovedAttention` / :class:`RemovedMlp`). ``out_proj``,
    ``scale`` and ``heads`` name the attention's output projection, softmax-scale and head-count
    attributes; HF attention infers the head count from ``q_proj`` and reads ``head_dim``."""
    C = cfg.embed_dim
    if dims.attention:
        attention.q_proj, attention.k_proj, attention.v_proj = (
            nn.Linear(C, dims.heads * dims.qk_dim, bias=cfg.qkv_bias) for _ in range(3))
        setattr(attention, out_proj, nn.Linear(dims.heads * dims.v_dim, C))
        attention.head_dim = dims.qk_dim
        setattr(attention, scale, dims.scale)
        setattr(attention, heads, dims.heads)
    else:
        attention = RemovedAttention()
    if not dims.mlp:
        mlp = RemovedMlp()
    elif hasattr(mlp, "gate_proj"):
        mlp.gate_proj, mlp.up_proj = nn.Linear(C, dims.mlp_dim), nn.Linear(C, dims.mlp_dim)
        mlp.down_proj = nn.Linear(dims.mlp_dim, C)
    else:
        mlp.fc1, mlp.fc2 = nn.Linear(C, dims.mlp_dim), nn.Linear(dims.mlp_dim, C)
    return attention, mlp


def block_to_canonical(p: str, attention: nn.Module, out_proj: str, norm1: nn.Module, mlp: nn.Module,
                       norm2: nn.Module) -> dict[str, torch.Tensor]:
    """The canonical weights of block ``p`` (``"blocks.i."``) from an HF layer with separate
    ``q_proj``/``k_proj``/``v_proj``, the output projection named ``out_proj`` and ``fc1``/``fc2``
    (or a gated ``gate_proj``/``up_proj``/``down_proj``: canonical fc1 is [gate | up]); a removed
    attention or MLP contributes nothing (nor does its norm)."""
    state: dict[str, torch.Tensor] = {}
    if not isinstance(attention, RemovedAttention):
        a, out = attention, getattr(attention, out_proj)
        state[p + "attn.qkv.weight"] = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        if a.q_proj.bias is not None:
            state[p + "attn.qkv.bias"] = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        state[p + "attn.proj.weight"], state[p + "attn.proj.bias"] = out.weight, out.bias
        state[p + "norm1.weight"], state[p + "norm1.bias"] = norm1.weight, norm1.bias
    if not isinstance(mlp, RemovedMlp):
        fc1, fc2 = _mlp_linears(mlp)
        state[p + "mlp.fc1.weight"] = torch.cat([fc.weight for fc in fc1])
        state[p + "mlp.fc1.bias"] = torch.cat([fc.bias for fc in fc1])
        state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"] = fc2.weight, fc2.bias
        state[p + "norm2.weight"], state[p + "norm2.bias"] = norm2.weight, norm2.bias
    return state


def block_from_canonical(src: Mapping[str, torch.Tensor], p: str, dims: Any, names: Mapping[str, str],
                         gated: bool = False) -> dict[str, torch.Tensor]:
    """The reverse of :func:`block_to_canonical`: HF state-dict entries for canonical block ``p``.

    ``dims`` is the block's :class:`~vitrim.models.BlockDims`; ``names`` maps ``"attention"``,
    ``"out_proj"``, ``"norm1"``, ``"mlp"`` and ``"norm2"`` to the full HF key prefixes of one layer
    (e.g. ``"vit.layers.0.attention"``); ``gated``: the MLP is ``gate_proj``/``up_proj``/``down_proj``.
    """
    state: dict[str, torch.Tensor] = {}
    if dims.attention:
        sizes = [dims.heads * dims.qk_dim, dims.heads * dims.qk_dim, dims.heads * dims.v_dim]
        for kind in ("weight", "bias"):
            if f"{p}attn.qkv.{kind}" in src:
                for proj, tensor in zip(("q_proj", "k_proj", "v_proj"), src[f"{p}attn.qkv.{kind}"].split(sizes)):
                    state[f"{names['attention']}.{proj}.{kind}"] = tensor
            state[f"{names['out_proj']}.{kind}"] = src[f"{p}attn.proj.{kind}"]
            state[f"{names['norm1']}.{kind}"] = src[f"{p}norm1.{kind}"]
    if dims.mlp:
        fc1, fc2 = (("gate_proj", "up_proj"), "down_proj") if gated else (("fc1",), "fc2")
        for kind in ("weight", "bias"):
            for name, tensor in zip(fc1, src[f"{p}mlp.fc1.{kind}"].chunk(len(fc1))):
                state[f"{names['mlp']}.{name}.{kind}"] = tensor
            state[f"{names['mlp']}.{fc2}.{kind}"] = src[f"{p}mlp.fc2.{kind}"]
            state[f"{names['norm2']}.{kind}"] = src[f"{p}norm2.{kind}"]
    return state
