"""One loader for every Hugging Face family's ``save_pretrained`` directory.

The family comes from ``config.json``: the class named in ``architectures`` (via
:func:`~vitrim.adapters.registry.hf_family_for`), else the ``model_type``, whose family then picks
the class from the weight names (``hf_infer_class``). The family's ``hf_check_config`` checks the
sizes and ``hf_load_options`` adds ``from_pretrained`` arguments; the file checks (safetensors only,
index shards, complete weights) are :mod:`vitrim.adapters.hf_common`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitrim.adapters.hf_common import (CONFIG_FILE, SAFETENSORS, is_hf_config, quiet_transformers, require_complete,
                                       require_transformers, weight_names)
from vitrim.adapters.registry import Family, hf_family_for, unsupported
from vitrim.errors import ConfigError, ModelFileError

DIR_FIX = f"a Hugging Face model directory holds {CONFIG_FILE} and {SAFETENSORS} (written by save_pretrained)"


def hf_class_of(config: dict[str, Any], names: list[str], source: Path | str) -> tuple[Family, str]:
    """The family and class of a ``config.json``: ``architectures``' class, else inferred from ``names``.

    An unknown class or ``model_type`` is a :class:`ConfigError` listing the supported families.
    """
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    named = architectures[0] if isinstance(architectures, list) and architectures else None
    if not isinstance(named, (str, type(None))):
        raise ModelFileError(f"{source}: 'architectures' must be a list of class names, got {architectures!r}")
    family = hf_family_for(model_type, named)
    if family is None:
        known_type = hf_family_for(model_type) is not None
        what = f"Hugging Face {named}" if named and known_type else f"a Hugging Face {named or repr(model_type)} model"
        raise unsupported(f"{source} ({what})")
    if named is not None:
        return family, named
    if family.hf_infer_class is None:
        raise ModelFileError(f"{source}/{CONFIG_FILE} names no class in \"architectures\"; add the class "
                             f"save_pretrained wrote, e.g. \"architectures\": [{family.hf_classes[0]!r}]")
    return family, family.hf_infer_class(config, names)


def read_hf_config(directory: Path) -> dict[str, Any]:
    """``directory``'s ``config.json``, checked to be a Hugging Face config."""
    from vitrim.io import read_json_file

    config = read_json_file(directory / CONFIG_FILE, f"{directory} has no {CONFIG_FILE}", DIR_FIX)
    if not is_hf_config(config):
        raise ModelFileError(f"{directory / CONFIG_FILE} is not a Hugging Face config (no \"model_type\"); {DIR_FIX}")
    return config


def load_hf_dir(directory: str | Path) -> nn.Module:
    """The Hugging Face model saved in ``directory`` (fp32, eval mode), of a registered family, checked."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelFileError(f"Hugging Face model directory {directory} does not exist")
    config = read_hf_config(directory)
    names = weight_names(directory)
    family, hf_class = hf_class_of(config, names, directory)
    if family.hf_check_config is not None:
        family.hf_check_config(config, directory / CONFIG_FILE)
    transformers = require_transformers()
    model_class = getattr(transformers, hf_class)
    config_class = (getattr(transformers, family.hf_config_class(hf_class)) if family.hf_config_class
                    else model_class.config_class)
    try:
        hf_config = config_class.from_dict(config)
    except (TypeError, ValueError, KeyError) as exc:
        raise ModelFileError(f"{directory / CONFIG_FILE} is not a valid {config_class.__name__} ({exc})") from None
    try:
        with quiet_transformers():
            model, info = model_class.from_pretrained(
                directory, config=hf_config, use_safetensors=True, local_files_only=True, dtype=torch.float32,
                ignore_mismatched_sizes=True, output_loading_info=True, **family.hf_load_options(hf_class, names))
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{directory}: transformers could not load it ({str(exc).splitlines()[0]})") from None
    require_complete(info, directory)
    if family.check is not None:
        try:
            family.check(model)
        except ConfigError as exc:
            raise ConfigError(f"{directory}: {exc}") from None
    return model.eval()
