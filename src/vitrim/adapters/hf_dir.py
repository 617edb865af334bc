"""Hugging Face model directories as ``save_pretrained`` writes them: ``config.json`` + safetensors.

Only safetensors weights are read (``use_safetensors=True``; a ``pytorch_model.bin`` is pickle and
is refused), and only from the directory itself (``local_files_only``). The class comes from
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

CONFIG_FILE = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")
MODEL_TYPES = ("vit", "deit")


def is_hf_config(data: Any) -> bool:
    """True for a parsed ``config.json`` written by ``transformers`` (it names a ``model_type``)."""
    return isinstance(data, dict) and "model_type" in data and data.get("format") != "vitrim"


def weight_names(directory: Path) -> list[str]:
    """Tensor names in the directory's safetensors weights (one file, or shards with an index)."""
    index, single = directory / SAFETENSORS_INDEX, directory / SAFETENSORS
    if index.is_file():
        try:
            return list(json.loads(index.read_text())["weight_map"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise ModelFileError(f"{index} is not a valid safetensors index ({exc})") from None
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
