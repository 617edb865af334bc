"""Training hyper-parameters, shared by ``vitrim train`` and :func:`vitrim.train.fit`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from vitrim.errors import ConfigError


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float | None = None  # None: 1 epoch, or a tenth of a run shorter than 10 epochs
    label_smoothing: float = 0.1
    augment: str = "crop"  # comma-separated "crop", "flip", or "none"; flips suit only some data
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "auto"  # auto | bf16 | fp16 (with a gradient scaler) | fp32
    distill_alpha: float = 0.5  # weight of the teacher's KL term when a teacher is given
    distill_temperature: float = 1.0
    limit_train: int | None = None  # use only the first N training images (quick trials)

    def __post_init__(self) -> None:
        self.augment = normalize_augment(self.augment)
        if self.warmup_epochs is None and isinstance(self.epochs, int):
            self.warmup_epochs = min(1.0, 0.1 * self.epochs)
        bad = [n for n in NUMBERS if not (_is_number(getattr(self, n)) and math.isfinite(getattr(self, n)))]
        if bad:
            raise ConfigError("invalid training setting: " + ", ".join(f"{n}={getattr(self, n)!r}" for n in bad)
                              + " (each must be a finite number)")
        checks = {
            "epochs": _is_int(self.epochs) and self.epochs >= 1,
            "batch_size": _is_int(self.batch_size) and self.batch_size >= 1,
            "lr": self.lr > 0, "min_lr": 0 <= self.min_lr <= self.lr,
            "weight_decay": self.weight_decay >= 0, "warmup_epochs": 0 <= self.warmup_epochs <= self.epochs,
            "label_smoothing": 0 <= self.label_smoothing < 1, "grad_clip": self.grad_clip >= 0,
            "seed": _is_int(self.seed) and 0 <= self.seed <= MAX_SEED,
            "distill_alpha": 0 <= self.distill_alpha <= 1, "distill_temperature": self.distill_temperature > 0,
            "precision": self.precision in PRECISIONS,
            "limit_train": self.limit_train is None or (_is_int(self.limit_train) and self.limit_train >= 1),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigError("invalid training setting: " + ", ".join(f"{n}={getattr(self, n)!r}" for n in bad)
                              + f" (ranges: {'; '.join(RANGES[n] for n in bad)})")

    @property
    def augmentations(self) -> tuple[str, ...]:
        """The random transforms applied to training batches (empty: none)."""
        return () if self.augment == "none" else tuple(self.augment.split(","))

    def differences(self, other: "TrainConfig") -> list[str]:
        """``name: mine vs other`` for every setting that differs."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{k} {theirs[k]!r} vs {mine[k]!r}" for k in mine if mine[k] != theirs[k]]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def lr_at(self, step: int, total_steps: int, steps_per_epoch: int) -> float:
        """Linear warm-up, then cosine decay to ``min_lr``."""
        warmup = int(self.warmup_epochs * steps_per_epoch)  # type: ignore[operator]
        if step < warmup:
            return self.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


MAX_SEED = 2**63 - 1
PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # fp16 trains with a gradient scaler
NUMBERS = ("lr", "min_lr", "weight_decay", "warmup_epochs", "label_smoothing", "grad_clip", "distill_alpha",
           "distill_temperature")
RANGES = {
    "epochs": "an integer >= 1", "batch_size": "an integer >= 1", "lr": "> 0", "min_lr": "0 <= min_lr <= lr",
    "weight_decay": ">= 0", "warmup_epochs": "0 <= warmup_epochs <= epochs", "label_smoothing": "0 <= x < 1",
    "grad_clip": ">= 0 (0: no clipping)", "seed": f"an integer in 0..{MAX_SEED}", "distill_alpha": "0 <= x <= 1",
    "distill_temperature": "> 0", "precision": "auto, bf16, fp16 or fp32", "limit_train": "an integer >= 1",
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def normalize_augment(spec: Any) -> str:
    """``"crop,flip"``-style augmentation spec, checked; ``True``/``False`` (older configs) mean
    crop and flip / none."""
    from vitrim.data.dataset import AUGMENTATIONS

    if spec is True:
        return ",".join(AUGMENTATIONS)
    if spec is False or spec is None:
        return "none"
    if not isinstance(spec, str):
        raise ConfigError(f"augment must be a string like 'crop,flip' or 'none', got {spec!r}")
    parts = [part.strip() for part in spec.split(",") if part.strip()]
    if parts == ["none"]:
        return "none"
    unknown = [part for part in parts if part not in AUGMENTATIONS]
    if unknown or not parts:
        raise ConfigError(f"unknown augmentation {spec!r}: use a comma-separated subset of "
                          f"{', '.join(AUGMENTATIONS)}, or none")
    return ",".join(a for a in AUGMENTATIONS if a in parts)
