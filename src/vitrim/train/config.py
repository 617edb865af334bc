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
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    augment: bool = True
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "auto"  # auto | bf16 | fp32
    distill_alpha: float = 0.5  # weight of the teacher's KL term when a teacher is given
    distill_temperature: float = 1.0
    limit_train: int | None = None  # use only the first N training images (quick trials)

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1, "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0 and math.isfinite(self.lr), "min_lr": 0 <= self.min_lr <= self.lr,
            "weight_decay": self.weight_decay >= 0, "warmup_epochs": self.warmup_epochs >= 0,
            "label_smoothing": 0 <= self.label_smoothing < 1, "grad_clip": self.grad_clip >= 0,
            "distill_alpha": 0 <= self.distill_alpha <= 1, "distill_temperature": self.distill_temperature > 0,
            "precision": self.precision in ("auto", "bf16", "fp32"),
            "limit_train": self.limit_train is None or self.limit_train >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigError("invalid training setting: " + ", ".join(f"{n}={getattr(self, n)!r}" for n in bad))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def lr_at(self, step: int, total_steps: int, steps_per_epoch: int) -> float:
        """Linear warm-up, then cosine decay to ``min_lr``."""
        warmup = int(self.warmup_epochs * steps_per_epoch)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
