"""Model specs: the one place a spec becomes a model, for ``vitrim.load``, every ``vitrim`` command,
:func:`vitrim.compress.compress`'s callers and the benchmarks.

* a vitrim model directory (``config.json`` with ``"format": "vitrim"`` + ``model.safetensors``);
* a Hugging Face directory written by ``save_pretrained`` (found by its ``config.json``), or
  ``hf:DIR`` to say so explicitly: any registered Hugging Face family;
* ``PREFIX:NAME`` of a family that owns a prefix, e.g. ``timm:NAME`` (timm's own builder, random
  weights unless ``pretrained``);
* with ``onnx=True``: a ``.onnx`` file (run in ONNX Runtime) or an integer-only model directory;
* a preset name (see ``vitrim models``): its bundled weights, or random ones if allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitrim.adapters import is_converted, to_canonical
from vitrim.adapters.registry import spec_prefixes
from vitrim.errors import ConfigError, UnknownModelError
from vitrim.models import ViTConfig, VisionTransformer, get_preset

SPEC_HELP = ("a vitrim model directory, a preset name (see `vitrim models`), a Hugging Face ViT/DeiT, DINOv2, "
             "CLIP or SigLIP vision directory (save_pretrained; or hf:DIR), or timm:NAME (e.g. "
             "timm:deit_small_patch16_224)")
HF_PREFIX = "hf"
FORMS = ("family", "canonical", "native")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec: ``kind`` is ``"hf"``, a family's prefix (``"timm"``), ``"dir"`` or ``"preset"``."""

    kind: str
    target: str

    @property
    def stem(self) -> str:
        """A short name for output directories: ``deit_small_patch16_224``, a directory's name, a preset."""
        if self.kind in spec_prefixes():
            return self.target.removeprefix("hf-hub:").replace("/", "_")
        return Path(self.target).name if self.kind in (HF_PREFIX, "dir") else self.target


def parse_spec(spec: str | Path) -> ModelSpec:
    """``hf:DIR`` / ``PREFIX:NAME`` by prefix, an existing directory, else a preset name."""
    text = str(spec)
    prefix, sep, rest = text.partition(":")
    if sep and (prefix == HF_PREFIX or prefix in spec_prefixes()):
        if not rest:
            raise ConfigError(f"model spec {text!r} is incomplete: use hf:DIR or "
                              f"{' or '.join(f'{p}:NAME' for p in spec_prefixes())}")
        return ModelSpec(prefix, rest)
    return ModelSpec("dir" if Path(text).is_dir() else "preset", text)


@dataclass
class Loaded:
    """A resolved model and where its weights came from."""

    model: Any
    weights: str  # "trained" (a directory or bundled weights), "pretrained", "random", "onnx" or "int-only"
    spec: ModelSpec


def create(name_or_config: str | ViTConfig, seed: int | None = None) -> VisionTransformer:
    """A randomly initialised model from a preset name or a :class:`ViTConfig`."""
    cfg = get_preset(name_or_config).build() if isinstance(name_or_config, str) else name_or_config
    if seed is not None:
        torch.manual_seed(seed)
    return VisionTransformer(cfg).eval()


def is_runtime_spec(spec: str | Path) -> bool:
    """True for what :mod:`vitrim.quant` runs itself: a ``*.onnx`` path or any existing regular file
    (model directories are not files), or an integer-only model directory."""
    from vitrim.quant.intonly_file import is_int_only_dir

    path = Path(spec)
    return path.suffix.lower() == ".onnx" or path.is_file() or is_int_only_dir(path)


def load_model(spec: str | Path, *, pretrained: bool = False, allow_random: bool = False,
               require_trained: bool = False, form: str = "family", onnx: bool = False,
               threads: int | None = None, preprocessing: Any = None) -> Loaded:
    """Resolve ``spec`` to a model, in eval mode.

    ``pretrained`` asks a prefix family (timm) for its pretrained weights; ``allow_random`` lets a
    preset without bundled weights come back randomly initialised; ``require_trained`` refuses
    random weights of any kind (``timm:NAME`` without ``pretrained``). ``form``: ``"family"`` (the
    family's own class, as ``vitrim.load`` returns it), ``"canonical"`` (the exact canonical ViT)
    or ``"native"`` (run by the family's own forward with the canonical config, for latency and
    accuracy). ``onnx`` also accepts ``.onnx`` files, opened in ONNX Runtime with ``threads`` and
    ``preprocessing``, and integer-only model directories.
    """
    if form not in FORMS:
        raise ConfigError(f"form {form!r} is not one of {', '.join(FORMS)}")
    if onnx and is_runtime_spec(spec):
        return _load_runtime(str(spec), threads, preprocessing)
    loaded = _load_torch(parse_spec(spec), pretrained, allow_random)
    if loaded.weights == "random" and require_trained and not allow_random:
        raise ConfigError(f"{spec} has random weights here; add --pretrained for timm's trained weights "
                          f"(needs the network or timm's local cache)")
    if form != "family" and is_converted(loaded.model):
        from vitrim.adapters.native import NativeModel

        loaded.model = NativeModel(loaded.model) if form == "native" else to_canonical(loaded.model)
    return loaded


def _load_runtime(spec: str, threads: int | None, preprocessing: Any) -> Loaded:
    from vitrim.quant.intonly_file import is_int_only_dir, load_int_only
    from vitrim.quant.runtime import OnnxModel

    parsed = ModelSpec("dir" if Path(spec).is_dir() else "file", spec)
    if is_int_only_dir(spec):
        return Loaded(load_int_only(spec), "int-only", parsed)
    return Loaded(OnnxModel(spec, threads=threads, preprocessing=preprocessing), "onnx", parsed)


def _load_torch(parsed: ModelSpec, pretrained: bool, allow_random: bool) -> Loaded:
    prefixes = spec_prefixes()
    if pretrained and parsed.kind not in prefixes:
        raise ConfigError(f"--pretrained (pretrained=True) applies to {', '.join(f'{p}:NAME' for p in prefixes)} "
                          f"models; {parsed.target} carries its own weights")
    if parsed.kind in prefixes:
        model = prefixes[parsed.kind].load_spec(parsed.target, pretrained)
        return Loaded(model, "pretrained" if pretrained else "random", parsed)
    if parsed.kind in (HF_PREFIX, "dir"):
        return Loaded(_load_directory(Path(parsed.target), hf=parsed.kind == HF_PREFIX), "trained", parsed)
    return _load_preset(parsed, allow_random)


def _load_directory(directory: Path, hf: bool) -> nn.Module:
    from vitrim.adapters.hf_common import is_hf_config
    from vitrim.adapters.hf_dir import load_hf_dir
    from vitrim.io import CONFIG_FILE, load_dir, read_json_file

    if hf:
        return load_hf_dir(directory)
    config = directory / CONFIG_FILE
    fix = "a model directory holds config.json and model.safetensors (vitrim.save or save_pretrained)"
    if config.is_file() and is_hf_config(read_json_file(config, "", fix)):
        return load_hf_dir(directory)
    return load_dir(directory)


def _load_preset(parsed: ModelSpec, allow_random: bool) -> Loaded:
    from vitrim.io import load_dir

    preset = get_preset(parsed.target)
    weights = preset.weights_dir()
    if weights is not None:
        return Loaded(load_dir(weights), "trained", parsed)
    if not allow_random:
        raise UnknownModelError(
            f"preset {parsed.target!r} has no trained weights; use vitrim.create({parsed.target!r}) for a randomly "
            f"initialised model, or train one with `vitrim train --model {parsed.target}`")
    return Loaded(create(parsed.target, seed=0), "random", parsed)
