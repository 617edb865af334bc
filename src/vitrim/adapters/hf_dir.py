"""Hugging Face model directories as ``save_pretrained`` writes them: ``config.json`` + safetensors.

Only safetensors weights are read, and only from the directory itself (``local_files_only``): a
``pytorch_model.bin`` is pickle and is refused, and so is a ``model.safetensors.index.json`` naming
any file but a ``.safetensors`` shard in the directory (transformers would unpickle a ``.bin`` shard
even with ``use_safetensors=True``). The ``config.json`` sizes are type- and memory-checked before
transformers builds anything. The class comes from
``config.json``'s ``architectures`` (else from the weight names); a ``ViTModel``/``DeiTModel`` gets
its pooler when the weights hold one. Weights that do not match the config are an error, never a
silent random re-initialisation.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from vitrim.adapters import unsupported
from vitrim.adapters.hf import FAMILIES as HF_CLASSES, check
from vitrim.errors import ConfigError, ModelFileError
from vitrim.models import BlockDims

CONFIG_FILE = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")
MODEL_TYPES = ("vit", "deit")


def is_hf_config(data: Any) -> bool:
    """True for a parsed ``config.json`` written by ``transformers`` (it names a ``model_type``)."""
    return isinstance(data, dict) and "model_type" in data and data.get("format") != "vitrim"


SAFE_FIX = "save the model with save_pretrained(..., safe_serialization=True)"
# transformers' ViTConfig defaults, used for the keys a config.json leaves out.
HF_SIZE_DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "intermediate_size": 3072, "image_size": 224, "patch_size": 16, "num_channels": 3}
# vitrim's name for each size -> the Hugging Face config key, for error messages.
HF_KEY_NAMES = {"embed_dim": "hidden_size", "blocks": "num_hidden_layers", "heads": "num_attention_heads",
                "qk_dim": "hidden_size / num_attention_heads", "v_dim": "hidden_size / num_attention_heads",
                "mlp_dim": "intermediate_size", "image_size": "image_size", "patch_size": "patch_size",
                "in_chans": "num_channels", "num_classes": "id2label"}


def weight_names(directory: Path) -> list[str]:
    """Tensor names in the directory's safetensors weights (one file, or shards with an index).

    Every file the index names must be a ``.safetensors`` file in ``directory``: transformers
    would unpickle a ``pytorch_model.bin`` named there even when told to load safetensors only.
    """
    index, single = directory / SAFETENSORS_INDEX, directory / SAFETENSORS
    if index.is_file():
        return list(_index_weight_map(directory, index))
    if not single.is_file():
        pickled = [name for name in PICKLED if (directory / name).is_file()]
        found = f" (it has {pickled[0]}, a pickle file vitrim does not load)" if pickled else ""
        raise ModelFileError(f"{directory} has no {SAFETENSORS}{found}; save the model with "
                             f"save_pretrained(..., safe_serialization=True)")
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


def check_hf_config(config: dict[str, Any], source: Path | str) -> None:
    """Type- and size-check the ``config.json`` fields transformers sizes a ViT/DeiT from.

    A :class:`ModelFileError` names a key whose value is not a positive integer; a
    :class:`ConfigError` (from :func:`vitrim.limits.check_model_memory`) refuses a model too large
    for this machine's RAM, both before transformers allocates anything.
    """
    from vitrim.limits import MAX_DEPTH, MAX_WIDTH, ModelShape, check_model_memory

    sizes: dict[str, int] = {}
    for key, default in HF_SIZE_DEFAULTS.items():
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
    labels = config.get("id2label")
    if labels is not None and not isinstance(labels, dict):
        raise ModelFileError(f"{source}: 'id2label' must be an object mapping class indices to names, "
                             f"got {labels!r}")
    count = len(labels) if labels else config.get("num_labels", 2)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ModelFileError(f"{source}: 'num_labels' must be a positive integer, got {count!r}")
    if count > MAX_WIDTH:
        raise ConfigError(f"{source}: {count} classes is beyond any model vitrim runs (at most {MAX_WIDTH})")
    heads = sizes["num_attention_heads"]
    head_dim = max(sizes["hidden_size"] // heads, 1)
    block = BlockDims(heads=heads, qk_dim=head_dim, v_dim=head_dim, mlp_dim=sizes["intermediate_size"])
    shape = ModelShape(image_size=sizes["image_size"], patch_size=sizes["patch_size"],
                       in_chans=sizes["num_channels"], embed_dim=sizes["hidden_size"],
                       blocks=[block] * sizes["num_hidden_layers"], num_classes=count,
                       num_prefix_tokens=2 if config.get("model_type") == "deit" else 1)
    check_model_memory(shape, keys=HF_KEY_NAMES, source=str(source))


def hf_class_of(config: dict[str, Any], names: list[str], source: Path) -> str:
    """The supported class named by ``architectures``, else inferred from the weight names."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    named = architectures[0] if isinstance(architectures, list) and architectures else None
    if model_type not in MODEL_TYPES:
        raise unsupported(f"{source} (a Hugging Face {named or repr(model_type)} model)")
    if named is None:
        prefix = "DeiT" if model_type == "deit" else "ViT"
        if any(n.startswith("cls_classifier.") for n in names):
            return "DeiTForImageClassificationWithTeacher"
        return f"{prefix}ForImageClassification" if any(n.startswith("classifier.") for n in names) \
            else f"{prefix}Model"
    if named not in HF_CLASSES:
        raise unsupported(f"{source} (Hugging Face {named})")
    return named


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


def load_hf_dir(directory: str | Path) -> nn.Module:
    """The Hugging Face ViT/DeiT model saved in ``directory`` (fp32, eval mode), checked for vitrim."""
    from vitrim.io import read_json_file

    directory = Path(directory)
    if not directory.is_dir():
        raise ModelFileError(f"Hugging Face model directory {directory} does not exist")
    fix = f"a Hugging Face model directory holds {CONFIG_FILE} and {SAFETENSORS} (written by save_pretrained)"
    config = read_json_file(directory / CONFIG_FILE, f"{directory} has no {CONFIG_FILE}", fix)
    if not is_hf_config(config):
        raise ModelFileError(f"{directory / CONFIG_FILE} is not a Hugging Face config (no \"model_type\"); {fix}")
    names = weight_names(directory)
    hf_class = hf_class_of(config, names, directory)
    check_hf_config(config, directory / CONFIG_FILE)
    try:
        import transformers
    except ImportError:
        raise ConfigError("Hugging Face models need transformers: pip install 'vitrim[hf]'") from None
    try:
        hf_config = getattr(transformers, HF_CLASSES[hf_class][1]).from_dict(config)
    except (TypeError, ValueError, KeyError) as exc:
        raise ModelFileError(f"{directory / CONFIG_FILE} is not a valid {HF_CLASSES[hf_class][1]} ({exc})") from None
    options: dict[str, Any] = {}
    if hf_class.endswith("Model"):
        options["add_pooling_layer"] = any(n.endswith("pooler.dense.weight") for n in names)
    try:
        with quiet_transformers():
            model, info = getattr(transformers, hf_class).from_pretrained(
                directory, config=hf_config, use_safetensors=True, local_files_only=True, dtype=torch.float32,
                ignore_mismatched_sizes=True, output_loading_info=True, **options)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{directory}: transformers could not load it ({str(exc).splitlines()[0]})") from None
    _require_complete(info, directory)
    try:
        check(model)
    except ConfigError as exc:
        raise ConfigError(f"{directory}: {exc}") from None
    return model.eval()


def _require_complete(info: dict[str, Any], directory: Path) -> None:
    """An error unless every weight matched the model ``config.json`` describes."""
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(kind) or ())
        if keys:
            problems.append(f"{kind.split('_')[0]} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}")
    if problems:
        raise ModelFileError(f"{directory}: the weights do not match {CONFIG_FILE} ({'; '.join(problems)}); the "
                             f"files come from different models (a pruned model saved with save_pretrained "
                             f"cannot be described by one config: save it with vitrim.save)")
