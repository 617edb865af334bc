"""Model specs: what ``vitrim.load`` and the ``vitrim`` commands accept as a model.

* a vitrim model directory (``config.json`` with ``"format": "vitrim"`` + ``model.safetensors``);
* a Hugging Face ViT/DeiT directory written by ``save_pretrained`` (found by its ``config.json``),
  or ``hf:DIR`` to say so explicitly;
* ``timm:NAME``: timm's own builder, random weights unless ``pretrained``;
* a preset name (see ``vitrim models``): its bundled weights, or random ones if allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from vitrim.errors import ConfigError, UnknownModelError

SPEC_HELP = ("a vitrim model directory, a preset name (see `vitrim models`), a Hugging Face ViT/DeiT "
             "directory (save_pretrained; or hf:DIR), or timm:NAME (e.g. timm:deit_small_patch16_224)")
PREFIXES = ("hf", "timm")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec: ``kind`` is ``"hf"``, ``"timm"``, ``"dir"`` or ``"preset"``; ``target`` the rest."""

    kind: str
    target: str

    @property
    def stem(self) -> str:
        """A short name for output directories: ``deit_small_patch16_224``, a directory's name, a preset."""
        if self.kind == "timm":
            return self.target.removeprefix("hf-hub:").replace("/", "_")
        return Path(self.target).name if self.kind in ("hf", "dir") else self.target


def parse_spec(spec: str | Path) -> ModelSpec:
    """``hf:DIR`` / ``timm:NAME`` by prefix, an existing directory, else a preset name."""
    text = str(spec)
    prefix, sep, rest = text.partition(":")
    if sep and prefix in PREFIXES:
        if not rest:
            raise ConfigError(f"model spec {text!r} is incomplete: use hf:DIR or timm:NAME")
        return ModelSpec(prefix, rest)
    return ModelSpec("dir" if Path(text).is_dir() else "preset", text)


@dataclass
class Loaded:
    """A resolved model in its own family and where its weights came from."""

    model: nn.Module
    weights: str  # "trained" (a directory or bundled weights), "pretrained" (timm) or "random"
    spec: ModelSpec


def load_model(spec: str | Path, *, pretrained: bool = False, allow_random: bool = False) -> Loaded:
    """Resolve ``spec`` to a model of its family (vitrim, Hugging Face or timm), in eval mode.

    ``pretrained`` asks timm for its pretrained weights (other specs carry their own);
    ``allow_random`` lets a preset without bundled weights come back randomly initialised.
    """
    parsed = parse_spec(spec)
    if pretrained and parsed.kind != "timm":
        raise ConfigError(f"--pretrained (pretrained=True) applies to timm:NAME models; {parsed.target} "
                          f"carries its own weights")
    if parsed.kind == "timm":
        from vitrim.adapters.timm_names import create_timm

        return Loaded(create_timm(parsed.target, pretrained), "pretrained" if pretrained else "random", parsed)
    if parsed.kind in ("hf", "dir"):
        return Loaded(_load_directory(Path(parsed.target), hf=parsed.kind == "hf"), "trained", parsed)
    return _load_preset(parsed, allow_random)


def _load_directory(directory: Path, hf: bool) -> nn.Module:
    from vitrim.adapters.hf_dir import is_hf_config, load_hf_dir
    from vitrim.io import CONFIG_FILE, load_dir, read_json_file

    if hf:
        return load_hf_dir(directory)
    config = directory / CONFIG_FILE
    fix = "a model directory holds config.json and model.safetensors (vitrim.save or save_pretrained)"
    if config.is_file() and is_hf_config(read_json_file(config, "", fix)):
        return load_hf_dir(directory)
    return load_dir(directory)


def _load_preset(parsed: ModelSpec, allow_random: bool) -> Loaded:
    from vitrim.api import create
    from vitrim.io import load_dir
    from vitrim.models import get_preset

    preset = get_preset(parsed.target)
    weights = preset.weights_dir()
    if weights is not None:
        return Loaded(load_dir(weights), "trained", parsed)
    if not allow_random:
        raise UnknownModelError(
            f"preset {parsed.target!r} has no trained weights; use vitrim.create({parsed.target!r}) for a randomly "
            f"initialised model, or train one with `vitrim train --model {parsed.target}`")
    return Loaded(create(parsed.target, seed=0), "random", parsed)
