"""Named model presets; some ship trained weights inside the package."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from vitrim.errors import UnknownModelError
from vitrim.models.config import ViTConfig, uniform_config

FASHION_KW = dict(image_size=28, patch_size=4, in_chans=1, num_classes=10, mean=(0.2860,),
                  std=(0.3530,))


@dataclass(frozen=True)
class Preset:
    name: str
    build: Callable[[], ViTConfig]
    description: str
    weights: str | None = None  # package-relative model directory holding trained weights

    def weights_dir(self) -> Path | None:
        if self.weights is None:
            return None
        path = Path(str(resources.files("vitrim") / self.weights))
        return path if (path / "model.safetensors").is_file() else None


PRESETS: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    PRESETS[preset.name] = preset
    return preset


def _fashion_reference() -> ViTConfig:
    from vitrim.data.fashion_mnist import FASHION_CLASSES

    return uniform_config(6, 192, 3, 4.0, class_names=list(FASHION_CLASSES), drop_path_rate=0.1,
                          **FASHION_KW)


register(Preset("fmnist-vit", _fashion_reference,
                "ViT-Tiny shape (192 wide, 3 heads of 64, MLP 768, depth 6) for 28x28 Fashion-MNIST, "
                "patch 4; trained weights bundled", weights="weights/fmnist-vit"))
register(Preset("fmnist-vit-197", lambda: _fashion_reference().replace(image_size=56),
                "fmnist-vit at DeiT's 197 tokens: 56x56 inputs (Fashion-MNIST upsampled: --resize), patch 4; "
                "fine-tuned from fmnist-vit; trained weights bundled", weights="weights/fmnist-vit-197"))
register(Preset("fmnist-vit-micro", lambda: uniform_config(2, 64, 2, 2.0, **FASHION_KW),
                "a tiny 2-block ViT for Fashion-MNIST, for tests and quick experiments"))
register(Preset("vit-tiny", lambda: uniform_config(12, 192, 3, 4.0),
                "ViT-Ti/16 at 224x224 (5.7 M params)"))
register(Preset("vit-small", lambda: uniform_config(12, 384, 6, 4.0),
                "ViT-S/16 at 224x224 (22 M params)"))
register(Preset("vit-base", lambda: uniform_config(12, 768, 12, 4.0),
                "ViT-B/16 at 224x224 (86 M params)"))


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UnknownModelError(
            f"unknown model {name!r}: not a model directory and not a preset "
            f"(presets: {', '.join(sorted(PRESETS))})"
        )
    return PRESETS[name]
