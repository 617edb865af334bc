"""The stacked pipeline on a detector or segmenter (``vitrim compress DENSE --data coco:DIR``).

The backbone is pruned by the task's own loss and recovered (:func:`~vitrim.dense.prune.prune_dense`),
its tokens are reduced statically and restored to the full patch grid before the pyramid (merge,
then unmerge), and the whole dense model is exported to ONNX (checked against PyTorch) and
quantized in ONNX Runtime, calibrated on the training split's images. Every stage is scored by
the task's metric on the val split (COCO mAP or mIoU), sized, counted (whole-model FLOPs) and
timed with all the others, interleaved, at batch 1 and 8; the report is the classification one's.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from vitrim.compress import (CompressConfig, against_first, check_compress, onnx_stages, parse_tokens, torch_size,
                             write_report)
from vitrim.dense.cost import dense_cost
from vitrim.dense.segmentation import normalised_batches
from vitrim.dense.tokens import DENSE_BATCHES
from vitrim.dense.train import check_classes, evaluate_dense, score_dense
from vitrim.errors import ConfigError
from vitrim.models.dense import DenseModel

SCORE_OF_TASK = {"detect": "map", "segment": "miou"}


class OnnxDense:
    """An ONNX Runtime dense model scored like its PyTorch original: images -> the head's maps,
    with the original's ``stride`` (a detector's boxes are decoded at it)."""

    training = False

    def __init__(self, runner: Any, stride: float) -> None:
        self.runner, self.stride = runner, stride

    @property
    def config(self) -> Any:
        return self.runner.config

    def eval(self) -> "OnnxDense":
        return self

    def train(self, mode: bool = True) -> "OnnxDense":
        self.runner.train(mode)
        return self

    def __call__(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, S, S) -> (B, K, h, w)
        return self.runner(images)


def check_dense_compress(model: DenseModel, train: Any, val: Any, cfg: CompressConfig, out_dir: str | Path) -> None:
    """Refuse, before any work, what a dense model's pipeline cannot honour."""
    from vitrim.quant.quantize import SCHEME_CALIBRATORS
    from vitrim.tokens import reduce_tokens

    if cfg.target is not None:
        raise ConfigError(DENSE_TARGET_ERROR)
    if cfg.quant is not None and cfg.calib_method == "blockwise":
        others = [c for c in SCHEME_CALIBRATORS[cfg.quant] if c != "blockwise"]
        raise ConfigError(f"blockwise calibration tunes a classifier's blocks against its logits; for a dense model "
                          f"use --calib-method {' or '.join(others)}")
    for split in (train, val):
        check_classes(model, split)
    if len(val) == 0:
        raise ConfigError(f"{val.name} holds no images to score the stages on; use a val split with images")
    if parse_tokens(cfg.tokens) is not None:  # the method and layers fit this backbone (before pruning)
        reduce_tokens(model.backbone, cfg.token_method, layers=cfg.token_layers)
    check_compress(model, train, cfg, out_dir)


DENSE_TARGET_ERROR = ("--target's joint search ranks the levers by a classifier's loss; for a detector or segmenter "
                      "give the levers: --prune flops=R --tokens keep=K --quant SCHEME")


def compress_dense(model: DenseModel, train: Any, val: Any, cfg: CompressConfig, out_dir: str | Path, *,
                   progress: bool = True, log: Callable[[str], None] = lambda text: None,
                   device: str | torch.device | None = None, batch_size: int = 32) -> dict[str, Any]:
    """Run the stages on ``model`` (its training split ``train`` and val split ``val``, both
    ``DenseSet``), write the artefacts and ``report.{json,md,png}`` to ``out_dir``, which appears
    whole or not at all. ``device``: where the torch stages are pruned, scored and timed; export,
    quantization and the ONNX Runtime stages run on the CPU."""
    from vitrim.bench.latency import interleaved_latency
    from vitrim.device import module_device, resolve_device
    from vitrim.fsutil import atomic_dir

    if not isinstance(model, DenseModel):
        raise ConfigError(f"compress_dense takes a vitrim DenseModel, got {type(model).__name__}")
    target = module_device(model) if device is None else resolve_device(device)
    check_dense_compress(model, train, val, cfg, out_dir)
    score = SCORE_OF_TASK[model.dense.task]
    with atomic_dir(out_dir) as tmp:
        stages, runners = dense_stages(model, train, val, cfg, tmp, progress=progress, log=log, device=target)
        for entry in stages:
            log(f"scoring {entry['stage']}")
            net = runners[entry["stage"]]
            entry["metrics"] = (evaluate_dense(net, val, batch_size, device=target) if isinstance(net, DenseModel)
                                else score_dense(net, model.dense.task, val, batch_size))
            entry[score] = entry["metrics"][score]
        log("timing every stage, interleaved")
        timed = interleaved_latency(runners, DENSE_BATCHES, threads=cfg.threads, runs=cfg.runs, device=target)
        for entry in stages:
            entry["latency"] = {str(b): timed[entry["stage"]][b] for b in DENSE_BATCHES}
            entry.setdefault("device", str(target))
            entry["threads"] = cfg.threads or torch.get_num_threads()
        against_first(stages, score)
        report = {"config": asdict(cfg), "task": model.dense.task, "score": score, "batches": list(DENSE_BATCHES),
                  "val": val.name, "val_images": len(val), "stages": stages}
        write_report(tmp, report)
    return report


def dense_stages(model: DenseModel, train: Any, val: Any, cfg: CompressConfig, out: Path, *, progress: bool,
                 log: Callable[[str], None], device: torch.device) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Build every stage: the entries (size, whole-model FLOPs, checks) and ``{stage: runner}``."""
    import vitrim
    from vitrim.dense.prune import prune_dense
    from vitrim.io import WEIGHTS_FILE
    from vitrim.tokens import reduce_tokens, reduced_flops

    check_images = next(normalised_batches(val, 16))[1]  # (16, C, S, S)
    stages: list[dict[str, Any]] = []
    runners: dict[str, Any] = {}

    def add(name: str, net: Any, size_bytes: int, flops: float, **extra: Any) -> None:
        stages.append({"stage": name, "size_bytes": size_bytes, "flops": flops, **extra})
        runners[name] = net

    model.eval()
    dense = dense_cost(model)  # pruning keeps the pyramid and head: their FLOPs hold for every stage
    add("torch fp32 dense", model, torch_size(model), dense["flops"])
    current: DenseModel = model
    if cfg.prune is not None:
        current, result = prune_dense(model, cfg.prune, train, recover=cfg.recover,
                                      calib_images=cfg.prune_calib, progress=progress,
                                      device=device, log=log)
        current.cpu().eval()
        vitrim.save(current, out / "pruned")
        add("torch fp32 pruned", current, (out / "pruned" / WEIGHTS_FILE).stat().st_size,
            dense_cost(current)["flops"], kept_ratio=result.kept_ratio)
    tokens = parse_tokens(cfg.tokens)
    if tokens is not None:
        view = reduce_tokens(current.backbone, cfg.token_method, layers=cfg.token_layers, keep=tokens[1])
        current = current.through(view)
        flops = reduced_flops(view, check_images.to(next(current.backbone.parameters()).device))
        add(f"+ tokens ({cfg.token_method} keep={tokens[1]:g}, restored)", current, torch_size(current),
            flops + dense["head_flops"], layers=list(view.layers))
    if cfg.quant is not None:
        calib = next(normalised_batches(train, cfg.calib))[1]  # (calib, C, S, S)
        onnx_stages(current, out, cfg, check_images, calib, add, stages[-1]["flops"], log=log,
                    wrap=lambda runner: OnnxDense(runner, model.stride))
    return stages, runners
