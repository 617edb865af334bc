"""Training and distillation loop: AdamW, warm-up + cosine, resumable per-epoch checkpoints."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from vitrim.bench.accuracy import evaluate
from vitrim.data.dataset import ImageSet
from vitrim.errors import ConfigError, DataError
from vitrim.fsutil import check_output_dir, locked_output
from vitrim.progress import progress_bar
from vitrim.train.checkpoint import load_checkpoint, save_checkpoint
from vitrim.train.config import TrainConfig

CHECKPOINT_DIR = "checkpoint"
# (model, images (B, C, H, W), labels (B,) or None) -> the batch's scalar loss, replacing
# cross-entropy / distillation (e.g. a feature distance to a teacher for label-free recovery)
TrainLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)


def use_bf16(precision: str) -> bool:
    if precision == "auto":
        return bool(torch.cpu._is_avx512_bf16_supported())
    return precision == "bf16"


@contextlib.contextmanager
def precision_context(bf16: bool):
    """bf16 autocast; attention on the math path, whose backward is fast in bf16 on CPU."""
    if not bf16:
        yield
        return
    with torch.autocast("cpu", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.MATH):
        yield


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms, LayerScale and the token/position embeddings."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(("pos_embed", "cls_token")) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on softened logits, scaled by T^2."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1),
                    reduction="batchmean", log_target=True) * t * t


def fit(
    model: nn.Module,
    train_set: ImageSet,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    test_set: ImageSet | None = None,
    teacher: nn.Module | None = None,
    resume: bool = False,
    image_size: int | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[nn.Module, dict[str, Any]], None] | None = None,
    locked: bool = False,
    loss_fn: TrainLoss | None = None,
) -> TrainResult:
    """Train ``model`` in place; checkpoint to ``out_dir/checkpoint`` after every epoch.

    The run holds :func:`vitrim.fsutil.output_lock` on ``out_dir`` (``locked``: the caller does),
    so a second run to the same place is refused. ``loss_fn`` replaces the cross-entropy and
    distillation loss (``teacher`` is then unused); without it, unlabelled ``train_set`` is
    refused unless the loss is pure distillation (``distill_alpha=1`` with a ``teacher``).
    """
    out_dir = check_output_dir(out_dir)
    check_teacher(model, teacher)
    if loss_fn is None and (teacher is None or cfg.distill_alpha < 1):
        train_set.require_labels("training with a cross-entropy loss")
    with locked_output(out_dir, held=locked):
        return _fit(model, train_set, cfg, out_dir, test_set, teacher, resume, image_size, progress, on_epoch_end,
                    loss_fn)


def check_teacher(model: nn.Module, teacher: nn.Module | None) -> None:
    """A teacher must predict the student's classes."""
    if teacher is None:
        return
    ours, theirs = (getattr(getattr(m, "config", None), "num_classes", None) for m in (model, teacher))
    if ours is not None and theirs is not None and ours != theirs:
        raise ConfigError(f"the teacher predicts {theirs} classes and the student {ours}; distil from a teacher "
                          f"trained on the same classes")


def resume_state(ckpt_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 cfg: TrainConfig) -> dict[str, Any]:
    """Load the checkpoint, refusing one made with other settings (they would be recorded as used)."""
    state = load_checkpoint(ckpt_dir, model, optimizer)
    saved = state.get("train_config", {})
    known = {k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__}
    try:
        differences = cfg.differences(TrainConfig(**known))
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"checkpoint in {ckpt_dir} has unusable settings ({exc}); start without --resume") from None
    if differences:
        raise ConfigError(f"checkpoint in {ckpt_dir} was made with other settings (checkpoint vs now: "
                          f"{'; '.join(differences)}); pass the same options to resume, or train to a new --out")
    return state


def _fit(model: nn.Module, train_set: ImageSet, cfg: TrainConfig, out_dir: Path, test_set: ImageSet | None,
         teacher: nn.Module | None, resume: bool, image_size: int | None, progress: bool,
         on_epoch_end: Callable[[nn.Module, dict[str, Any]], None] | None,
         loss_fn: TrainLoss | None = None) -> TrainResult:
    ckpt_dir = out_dir / CHECKPOINT_DIR
    if cfg.limit_train is not None:
        train_set = train_set.subset(min(cfg.limit_train, len(train_set)))
    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch < 1:
        raise DataError(f"{len(train_set)} training images are fewer than one batch of {cfg.batch_size}")
    total_steps = steps_per_epoch * cfg.epochs
    bf16 = use_bf16(cfg.precision)
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(0.9, 0.999))
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if resume:
        state = resume_state(ckpt_dir, model, optimizer, cfg)
        start_epoch, history = state["epoch"], state["history"]
    if teacher is not None:
        teacher.eval()

    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout / drop-path, repeatable on resume
        generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        model.train()
        batches = train_set.batches(cfg.batch_size, image_size=image_size, shuffle=True,
                                    augment=cfg.augmentations, generator=generator, drop_last=True)
        bar = progress_bar(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                           enabled=progress, unit="batch")
        started, loss_sum, seen = time.perf_counter(), 0.0, 0
        for i, (x, y) in enumerate(bar):
            step = epoch * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr_at(step, total_steps, steps_per_epoch)
            with precision_context(bf16):
                if loss_fn is not None:
                    loss = loss_fn(model, x, y)
                else:
                    logits = model(x)
                    # unlabelled images (y None) come here only for pure distillation (fit checks)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing) \
                        if y is not None else 0.0
                    if teacher is not None:
                        with torch.no_grad():
                            teacher_logits = teacher(x).float()
                        kd = distillation_loss(logits.float(), teacher_logits, cfg.distill_temperature)
                        loss = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * kd
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            loss_sum += loss.item() * x.shape[0]
            seen += x.shape[0]
            bar.set_postfix(refresh=False, loss=f"{loss_sum / seen:.4f}",
                            img_s=f"{seen / (time.perf_counter() - started):.0f}")
        record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": loss_sum / seen,
                                  "seconds": round(time.perf_counter() - started, 1)}
        if test_set is not None:
            metrics = evaluate(model, test_set, image_size=image_size)
            record.update(test_accuracy=metrics["accuracy"], test_loss=metrics["loss"])
        history.append(record)
        save_checkpoint(ckpt_dir, model, optimizer, {"epoch": epoch + 1, "history": history,
                                                     "train_config": cfg.to_dict()})
        if progress:
            summary = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
            print(summary, flush=True)
        if on_epoch_end is not None:
            on_epoch_end(model, record)
    model.eval()
    return TrainResult(model, history)
