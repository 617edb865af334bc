"""Training and distillation with resumable, pickle-free checkpoints."""

from vitrim.train.config import TrainConfig
from vitrim.train.loop import TrainResult, fit

__all__ = ["TrainConfig", "TrainResult", "fit"]
