"""Preprocessing metadata carried inside an ONNX model's ``metadata_props``.

Keys are prefixed ``vitrim.``; numbers and lists are JSON so any ONNX tool can read them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from vitrim.errors import ConfigError
from vitrim.models import ViTConfig
from vitrim.quant.errors import MissingMetadataError, OnnxFileError

PREFIX = "vitrim."
METADATA_VERSION = 1
FLAGS_HINT = "pass the preprocessing flags --image-size, --in-chans, --mean and --std"


@dataclass
class Preprocessing:
    """What a runtime needs to feed the model: input shape, normalisation, class names.

    ``config`` is the full vitrim model config when the model came from vitrim, else ``None``.
    """

    image_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str] | None = None
    num_classes: int | None = None
    config: ViTConfig | None = None

    def __post_init__(self) -> None:
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ConfigError(f"image size must be a positive integer, got {self.image_size!r}")
        if not isinstance(self.in_chans, int) or self.in_chans < 1:
            raise ConfigError(f"input channels must be a positive integer, got {self.in_chans!r}")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ConfigError(f"mean/std need {self.in_chans} values (one per input channel), "
                              f"got {len(self.mean)} and {len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"std values must be positive, got {self.std}")

    @classmethod
    def from_config(cls, cfg: ViTConfig) -> "Preprocessing":
        """The preprocessing a vitrim model config implies."""
        return cls(cfg.image_size, cfg.in_chans, cfg.mean, cfg.std, cfg.class_names, cfg.num_classes, cfg)

    def to_props(self) -> dict[str, str]:
        props = {
            "version": str(METADATA_VERSION),
            "image_size": str(self.image_size),
            "in_chans": str(self.in_chans),
            "mean": json.dumps(list(self.mean)),
            "std": json.dumps(list(self.std)),
        }
        if self.class_names is not None:
            props["class_names"] = json.dumps(self.class_names)
        if self.num_classes is not None:
            props["num_classes"] = str(self.num_classes)
        if self.config is not None:
            props["config"] = json.dumps(self.config.to_dict())
        return {PREFIX + k: v for k, v in props.items()}

    @classmethod
    def from_props(cls, props: dict[str, str], source: str) -> "Preprocessing":
        """Read the metadata back; raises :class:`MissingMetadataError` when there is none."""
        ours = {k[len(PREFIX):]: v for k, v in props.items() if k.startswith(PREFIX)}
        if "image_size" not in ours:
            raise MissingMetadataError(
                f"{source} has no vitrim preprocessing metadata (image size, channels, mean, std); "
                f"{FLAGS_HINT}, or export the model with `vitrim export`")
        try:
            config = ViTConfig.from_dict(json.loads(ours["config"])) if "config" in ours else None
            names = json.loads(ours["class_names"]) if "class_names" in ours else None
            num = int(ours["num_classes"]) if "num_classes" in ours else None
            return cls(int(ours["image_size"]), int(ours["in_chans"]), tuple(json.loads(ours["mean"])),
                       tuple(json.loads(ours["std"])), names, num, config)
        except (KeyError, ValueError, TypeError, ConfigError) as exc:
            raise OnnxFileError(f"{source} has damaged vitrim metadata ({type(exc).__name__}: {exc}); "
                                f"re-export the model with `vitrim export`") from None


def read_props(model: Any) -> dict[str, str]:
    """``metadata_props`` of an ``onnx.ModelProto`` as a dict."""
    return {p.key: p.value for p in model.metadata_props}


def write_props(model: Any, props: dict[str, str]) -> None:
    """Set (add or overwrite) entries of an ``onnx.ModelProto``'s ``metadata_props`` in place."""
    merged = read_props(model)
    merged.update(props)
    del model.metadata_props[:]
    for key, value in merged.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def info_props(kind: str, info: dict[str, Any]) -> dict[str, str]:
    """A JSON record under ``vitrim.<kind>`` (e.g. how the model was exported or quantized)."""
    return {PREFIX + kind: json.dumps(info, sort_keys=True)}


def read_info(props: dict[str, str], kind: str) -> dict[str, Any] | None:
    text = props.get(PREFIX + kind)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
