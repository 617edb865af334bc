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


def use_bf16(precision: str, device: torch.device | None = None) -> bool:
    """Whether training autocasts to bf16: ``auto`` where ``device`` (default: the CPU) supports it."""
    if precision == "auto":
        if device is not None and device.type == "cuda":
            return bool(torch.cuda.is_bf16_supported())
        if device is not None and device.type != "cpu":
            return False
        return bool(torch.cpu._is_avx512_bf16_supported())
    return precision == "bf16"


def autocast_dtype(precision: str, device: torch.device | None = None) -> torch.dtype | None:
    """The dtype training autocasts to (``None``: fp32): fp16 when asked (with a gradient scaler),
    bf16 as :func:`use_bf16` decides."""
    if precision == "fp16":
        return torch.float16
    return torch.bfloat16 if use_bf16(precision, device) else None


@contextlib.contextmanager
def precision_context(dtype: torch.dtype | bool | None, device: torch.device | None = None):
    """Autocast to ``dtype`` (``True``: bf16; ``None``/``False``: none) on ``device`` (default: the
    CPU); on the CPU attention takes the math path, whose backward is fast in bf16 there."""
    if dtype is True:
        dtype = torch.bfloat16
    if not dtype:
        yield
        return
    kind = "cpu" if device is None else device.type
    with torch.autocast(kind, dtype=dtype):
        if kind == "cpu":
            with sdpa_kernel(SDPBackend.MATH):
                yield
        else:
            yield


class _StepLoss(nn.Module):
    """The training loss as a module over the student only, so DistributedDataParallel can wrap it
    whatever the loss reads (logits, features); the teacher stays outside (never synchronised)."""

    def __init__(self, model: nn.Module, compute: Callable[[nn.Module, torch.Tensor, Any], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self._compute = compute

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self._compute(self.model, x, y)


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
    device: str | torch.device | None = None,
) -> TrainResult:
    """Train ``model`` in place; checkpoint to ``out_dir/checkpoint`` after every epoch.

    The run holds :func:`vitrim.fsutil.output_lock` on ``out_dir`` (``locked``: the caller does),
    so a second run to the same place is refused. ``loss_fn`` replaces the cross-entropy and
    distillation loss (``teacher`` is then unused); without it, unlabelled ``train_set`` is
    refused unless the loss is pure distillation (``distill_alpha=1`` with a ``teacher``).

    ``device``: where the model, the teacher and the batches live (``None``: where the model is).
    Under ``torchrun`` (:mod:`vitrim.distributed`) the model is wrapped in DistributedDataParallel;
    ``cfg.batch_size`` is the per-rank batch, the global batch ``batch_size x world size``, and
    each rank takes every ``world``-th image of each global batch of the epoch's permutation (a
    function of seed and epoch only), so a run matches one process with the global batch, and a
    checkpoint resumes under another world size. Rank 0 alone prints and writes the checkpoint
    (atomic); the others wait at a barrier.
    """
    from vitrim import distributed

    out_dir = check_output_dir(out_dir)
    check_teacher(model, teacher)
    if loss_fn is None and (teacher is None or cfg.distill_alpha < 1):
        train_set.require_labels("training with a cross-entropy loss")
    with locked_output(out_dir, held=locked or not distributed.is_main()):
        return _fit(model, train_set, cfg, out_dir, test_set, teacher, resume, image_size,
                    progress and distributed.is_main(), on_epoch_end, loss_fn, device)


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
         loss_fn: TrainLoss | None = None, device: str | torch.device | None = None) -> TrainResult:
    from vitrim import distributed
    from vitrim.device import module_device, resolve_device

    ckpt_dir = out_dir / CHECKPOINT_DIR
    if cfg.limit_train is not None:
        train_set = train_set.subset(min(cfg.limit_train, len(train_set)))
    world, rank = distributed.world_size(), distributed.rank()
    global_batch = cfg.batch_size * world
    steps_per_epoch = len(train_set) // global_batch
    if steps_per_epoch < 1:
        per = f" ({cfg.batch_size} per process x {world} processes)" if world > 1 else ""
        raise DataError(f"{len(train_set)} training images are fewer than one batch of {global_batch}{per}; "
                        f"use a smaller --batch-size")
    total_steps = steps_per_epoch * cfg.epochs
    target = module_device(model) if device is None else resolve_device(device)
    model.to(target)
    if teacher is not None:
        teacher.to(target).eval()
    dtype = autocast_dtype(cfg.precision, target)
    # fp16's narrow range: the loss is scaled up for the backward and the steps that overflow skipped
    scaler = torch.amp.GradScaler(target.type) if dtype == torch.float16 else None
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(0.9, 0.999))
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if resume:
        state = resume_state(ckpt_dir, model, optimizer, cfg)
        start_epoch, history = state["epoch"], state["history"]
        if scaler is not None and state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
    step_module = _StepLoss(model, _loss_computation(cfg, teacher, loss_fn))
    runner: nn.Module = step_module
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(step_module, device_ids=[target.index] if target.type == "cuda" else None,
                                         find_unused_parameters=True)
    if progress:
        print(f"training on {target}: global batch {global_batch} ({cfg.batch_size} per process x {world} "
              f"process(es)), {steps_per_epoch} steps per epoch, from step {start_epoch * steps_per_epoch}",
              flush=True)
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout / drop-path, repeatable on resume
        generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        model.train()
        batches = train_set.batches(global_batch, image_size=image_size, shuffle=True,
                                    augment=cfg.augmentations, generator=generator, drop_last=True)
        bar = progress_bar(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                           enabled=progress, unit="batch")
        started = time.perf_counter()
        sums = torch.zeros(2, dtype=torch.float64)  # loss x images, images (this rank's)
        for i, (x, y) in enumerate(bar):
            step = epoch * steps_per_epoch + i
            if world > 1:  # this rank's share of the global batch (every world-th image)
                x, y = x[rank::world], (y[rank::world] if y is not None else None)
            x = x.to(target, non_blocking=True)
            y = y.to(target, non_blocking=True) if y is not None else None
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr_at(step, total_steps, steps_per_epoch)
            with precision_context(dtype, target):
                loss = runner(x, y)
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if scaler is not None:
                scaler.unscale_(optimizer)  # clip the true gradients
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            sums += torch.tensor([loss.item() * x.shape[0], x.shape[0]], dtype=torch.float64)
            bar.set_postfix(refresh=False, loss=f"{sums[0] / sums[1]:.4f}",
                            img_s=f"{world * sums[1] / (time.perf_counter() - started):.0f}")
        loss_sum, seen = distributed.all_reduce_sum(sums).tolist()
        record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": loss_sum / seen,
                                  "seconds": round(time.perf_counter() - started, 1)}
        if test_set is not None:
            metrics = evaluate(model, test_set, image_size=image_size, device=target)
            record.update(test_accuracy=metrics["accuracy"], test_loss=metrics["loss"])
        history.append(record)
        if distributed.is_main():
            save_checkpoint(ckpt_dir, model, optimizer, {
                "epoch": epoch + 1, "global_step": (epoch + 1) * steps_per_epoch, "world_size": world,
                "global_batch": global_batch, "history": history, "train_config": cfg.to_dict(),
                "grad_scaler": scaler.state_dict() if scaler is not None else None})
        distributed.barrier()  # the others wait for the checkpoint
        if progress:
            summary = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
            print(summary, flush=True)
        if on_epoch_end is not None:
            on_epoch_end(model, record)
    model.eval()
    return TrainResult(model, history)


def _loss_computation(cfg: TrainConfig, teacher: nn.Module | None,
                      loss_fn: TrainLoss | None) -> Callable[[nn.Module, torch.Tensor, Any], torch.Tensor]:
    """The batch loss: ``loss_fn``, else cross-entropy (labels) mixed with distillation (teacher)."""
    if loss_fn is not None:
        return loss_fn

    def compute(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        logits = model(x)
        # unlabelled images (y None) come here only for pure distillation (fit checks)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing) if y is not None else 0.0
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(x).float()
            kd = distillation_loss(logits.float(), teacher_logits, cfg.distill_temperature)
            loss = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * kd
        return loss

    return compute
