"""Model directories: ``config.json`` (family, config, dimension plan) + ``model.safetensors``.

No pickle anywhere: weights are safetensors, everything else is JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vitrim.errors import ConfigError, ModelFileError
from vitrim.fsutil import atomic_dir, atomic_path, write_json
from vitrim.models import ViTConfig, VisionTransformer

FORMAT = "vitrim"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_state(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors to a safetensors file atomically (shared storage is cloned)."""
    flat = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=metadata)


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"weights file {path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path} is not a valid safetensors file ({exc}); "
                             f"re-save the model with vitrim.save") from None


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Strict load with a readable account of missing, unexpected and mis-shaped tensors."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = [f"{k}: file {tuple(state[k].shape)} vs config {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    if mis_shaped:
        problems.append(f"shape mismatch {'; '.join(mis_shaped[:5])}")
    if problems:
        raise ModelFileError(f"{source} does not match its config ({' | '.join(problems)}); "
                             f"the weights and config.json come from different models")
    model.load_state_dict(state, strict=True)


def read_json_file(path: Path, missing: str, fix: str) -> Any:
    """Parsed JSON; ``missing`` is the error when the file is absent, ``fix`` ends both errors."""
    if not path.is_file():
        raise ModelFileError(f"{missing}; {fix}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path} is not valid JSON ({exc}); {fix}") from None


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    data = read_json_file(path, f"{directory} has no {CONFIG_FILE}",
                          f"a model directory holds {CONFIG_FILE} and {WEIGHTS_FILE} (written by vitrim.save, "
                          f"or by save_pretrained for a Hugging Face model)")
    if not isinstance(data, dict) or data.get("format") != FORMAT or "config" not in data:
        raise ModelFileError(f"{path} is neither a vitrim model config (\"format\": \"vitrim\") nor a Hugging "
                             f"Face one (\"model_type\")")
    if data.get("version", 0) > FORMAT_VERSION:
        raise ModelFileError(f"{path} was written by a newer vitrim (format version "
                             f"{data['version']}); upgrade vitrim")
    return data


def save(model: nn.Module, directory: str | Path, extra: dict[str, Any] | None = None, *,
         add_files: Callable[[Path], None] | None = None, carry: Iterable[str] = (),
         locked: bool = False) -> Path:
    """Save a vitrim, Hugging Face or timm ViT as a directory that appears whole or not at all.

    The directory is built in a temporary sibling and swapped into place, so the previous
    ``directory`` stays intact until the new one is complete (a kill leaves one or the other).
    ``add_files(tmp)`` writes more files (a report) into the new directory before it appears;
    ``carry`` names entries of the previous directory to keep (a training ``checkpoint``);
    ``locked`` says the caller already holds :func:`vitrim.fsutil.output_lock` on ``directory``.

    A Hugging Face or timm model is stored as its canonical equivalent plus what its family needs
    to rebuild it (class, config), so per-layer dims that one family config cannot express
    survive; :func:`load_dir` rebuilds the family's class.
    """
    model, extra = _canonical_for_saving(model, extra)
    with atomic_dir(directory, carry=carry, locked=locked) as tmp:
        _write_model_files(model, model.config, tmp, extra)
        if add_files is not None:
            add_files(tmp)
    return Path(directory)


def _canonical_for_saving(model: nn.Module, extra: dict[str, Any] | None) -> tuple[nn.Module, dict[str, Any]]:
    """The module whose weights are stored, and the config entries that rebuild the original."""
    from vitrim.adapters import is_converted, metadata, to_canonical
    from vitrim.iret import IncrementalViT
    from vitrim.tokens import TokenReducedViT

    from vitrim.models.dense import DenseModel

    extra = dict(extra or {})
    if isinstance(model, IncrementalViT):
        return model, {**extra, "family": "iret", "iret": model.options.to_dict()}
    if isinstance(model, DenseModel):
        return model, {**extra, "family": "dense", "dense": model.dense.to_dict()}
    if isinstance(model, TokenReducedViT):  # the weights, and the reduction they serve
        extra["tokens"] = {"method": model.method, "layers": list(model.layers)}
        model = model.model
    elif isinstance(model, VisionTransformer) and model.token_reduction:
        extra["tokens"] = dict(model.token_reduction)
    if is_converted(model):
        extra.update(metadata(model))
        model = to_canonical(model)
    if not isinstance(model, VisionTransformer):
        from vitrim.adapters import unsupported

        raise unsupported(f"vitrim.save: {type(model).__name__}")
    return model, extra


def _write_model_files(model: nn.Module, config: ViTConfig, directory: Path, extra: dict[str, Any]) -> None:
    save_state(directory / WEIGHTS_FILE, model.state_dict(), metadata={"format": FORMAT})
    payload = {"format": FORMAT, "version": FORMAT_VERSION, "family": "vitrim", **extra,
               "config": config.to_dict()}
    write_json(directory / CONFIG_FILE, payload)


def check_token_reduction(settings: Any, path: Path) -> dict[str, Any]:
    """The saved ``{"method", "layers"}`` a model was fine-tuned for, checked."""
    from vitrim.tokens.model import METHODS

    if not (isinstance(settings, dict) and settings.get("method") in METHODS
            and isinstance(settings.get("layers"), list) and all(isinstance(i, int) for i in settings["layers"])):
        raise ModelFileError(f"{path}: \"tokens\" must be {{\"method\": one of {', '.join(METHODS)}, "
                             f"\"layers\": [block indices]}}, got {settings!r}")
    return {"method": settings["method"], "layers": list(settings["layers"])}


def load_dir(directory: str | Path) -> nn.Module:
    """Rebuild a saved model: a vitrim ViT, or the Hugging Face / timm class it was saved from."""
    directory = Path(directory)
    data = read_config(directory)
    family = data.get("family", "vitrim")
    try:
        cfg = ViTConfig.from_dict(data["config"])
        if family not in WRAPPED:
            _check_family(data, cfg.num_classes)  # before the weights are read
        model = _wrap(family, VisionTransformer(cfg), data)
    except (ConfigError, ModelFileError, TypeError) as exc:
        raise ModelFileError(f"{directory / CONFIG_FILE}: {exc}") from None
    load_weights_into(model, load_state(directory / WEIGHTS_FILE), directory / WEIGHTS_FILE)
    if family in WRAPPED:
        return model.eval()
    if "tokens" in data:
        model.token_reduction = check_token_reduction(data["tokens"], directory / CONFIG_FILE)
    from vitrim.adapters import from_canonical

    return from_canonical(model.eval(), data)


# Models saved whole around a canonical ViT (their own modules beside it): family -> config key.
WRAPPED = {"iret": "iret", "dense": "dense"}


def _wrap(family: str, vit: VisionTransformer, data: dict[str, Any]) -> nn.Module:
    """``vit`` itself, or the incremental-resolution ViT / dense model (segmenter, detector) a saved
    config describes."""
    if family == "iret":
        from vitrim.iret import IncrementalViT, IretOptions

        return IncrementalViT(vit, IretOptions.from_dict(data.get("iret", {})))
    if family == "dense":
        from vitrim.models.dense import DenseHeadConfig, DenseModel

        if not isinstance(data.get("dense"), dict):
            raise ModelFileError("a dense model's config needs a \"dense\" object (its head); re-save it with "
                                 "vitrim.save")
        return DenseModel(vit, DenseHeadConfig.from_dict(data["dense"]))
    return vit


def _check_family(data: dict[str, Any], num_classes: int) -> None:
    """A :class:`ModelFileError` for a saved config naming an unknown family or lacking what it needs."""
    from vitrim.adapters import check_family_metadata
    from vitrim.adapters.registry import families

    family = data.get("family", "vitrim")
    names = [f.name for f in families()] + list(WRAPPED)
    if family not in names:
        raise ModelFileError(f"it names an unknown model family {family!r} (known: {', '.join(names)}); "
                             f"re-save the model with vitrim.save")
    check_family_metadata(data, num_classes)
