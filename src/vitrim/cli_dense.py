"""Dense prediction on the command line: ``vitrim coco-synthetic``, and ``--data coco:DIR`` /
``--task segment|detect`` for ``train``, ``eval``, ``prune``, ``tokens``, ``compress``, ``export`` and
``bench`` on dense models (:class:`~vitrim.models.dense.DenseModel`). :mod:`vitrim.cli` dispatches here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from vitrim.cli_common import command_line, default_of, emit, threads
from vitrim.errors import ConfigError, DataError

COCO_PREFIX = "coco:"
TRAIN_RECIPE = {"epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "min_lr": "min_lr",
                "weight_decay": "weight_decay", "warmup_epochs": "warmup_epochs", "label_smoothing": "label_smoothing",
                "seed": "seed", "precision": "precision"}


def is_coco(spec: str | None) -> bool:
    """Whether ``--data`` names a COCO-format directory (``coco:DIR``)."""
    return isinstance(spec, str) and spec.startswith(COCO_PREFIX)


def coco_root(args: argparse.Namespace) -> Path:
    """``--data coco:DIR``'s directory; a :class:`ConfigError` for other data."""
    if not is_coco(args.data):
        raise ConfigError(f"dense models train, evaluate, prune and compress on COCO-format data: pass "
                          f"--data coco:DIR, not --data {args.data} (write a set with "
                          f"`vitrim coco-synthetic --out DIR`)")
    root = args.data[len(COCO_PREFIX):]
    if not root:
        raise ConfigError("--data coco: needs a directory: coco:DIR (DIR/annotations/instances_<split>.json)")
    return Path(root)


def is_dense(model: Any) -> bool:
    from vitrim.models.dense import DenseModel

    return isinstance(model, DenseModel)


def refuse_dense(model: Any, args: argparse.Namespace) -> None:
    """A dense model with classification data: one error naming the data it needs."""
    if is_dense(model):
        raise ConfigError(f"{args.model} is a dense {model.dense.task} model; vitrim {args.command} needs its task's "
                          f"data: --data coco:DIR")


def dense_model(spec: str, what: str, pretrained: bool = False) -> Any:
    """The dense model ``spec`` names; a classifier is refused with the command that makes one."""
    from vitrim.cli_common import resolve_model

    return require_dense(resolve_model(spec, pretrained=pretrained)[0], spec, what)


def require_dense(model: Any, spec: str, what: str) -> Any:
    """``model`` if it is a dense model; else a :class:`ConfigError` naming the command that makes one."""
    if not is_dense(model):
        raise ConfigError(f"{spec} is a {type(model).__name__} classifier, not a detector or segmenter; {what} "
                          f"with coco:DIR data takes a dense model (vitrim train --task detect|segment --data coco:DIR "
                          f"--init {spec} --out DIR)")
    return model


def load_split(args: argparse.Namespace, kind: str, model: Any) -> Any:
    """``kind`` (``train``/``val``) of ``--data coco:DIR`` at ``model``'s input size and normalisation;
    ``--limit`` applies to the split evaluated; skipped records are counted on stderr."""
    from vitrim.data.coco import find_split, load_coco

    root = coco_root(args)
    split = find_split(root, kind, getattr(args, f"{kind}_split", None))
    cfg = model.config
    data = load_coco(root, split, cfg.image_size, cfg.in_chans).for_model(cfg)
    if (kind == "val" or args.command == "eval") and getattr(args, "limit", None):
        data = data.subset(min(args.limit, len(data)))
    if data.skipped:
        print(f"{data.name}: skipped " + ", ".join(f"{n} {why}" for why, n in data.skipped.items()), file=sys.stderr)
    return data


def dense_check_images(args: argparse.Namespace, model: Any, count: int) -> torch.Tensor:
    """``vitrim export DENSE --data coco:DIR``: the first ``count`` val images, normalised (N, C, S, S)."""
    from vitrim.dense.segmentation import normalised_batches

    require_dense(model, args.model, "export")
    data = load_split(args, "val", model)
    if len(data) == 0:
        raise DataError(f"{data.name} holds no images to check the export on; use a split with images")
    return next(normalised_batches(data, count))[1]


def cmd_compress_dense(args: argparse.Namespace, cfg: Any, name: str, model: Any) -> None:
    """``vitrim compress DENSE --data coco:DIR``: the backbone pruned by the task loss, its tokens
    merged and restored for the head, the whole model exported and quantized; one report scored by
    the task's metric on the val split (:func:`vitrim.dense.compress.compress_dense`)."""
    from vitrim.adapters import family_of
    from vitrim.adapters.sources import load_model, parse_spec
    from vitrim.compress import stage_table
    from vitrim.dense.compress import compress_dense

    coco_root(args)
    if not is_dense(model) and family_of(load_model(name, form="native").model) == "hf-yolos":
        raise ConfigError(f"{name} is a YOLOS detector: vitrim compress stacks the levers on vitrim's dense models; "
                          f"prune it with vitrim prune {name} --data {args.data} --target flops=R --out DIR")
    require_dense(model, name, "compress")
    train, val = load_split(args, "train", model), load_split(args, "val", model)
    out = Path(args.out or f"runs/{parse_spec(name).stem}-compressed")
    progress = not args.json
    with threads(args.threads):
        report = compress_dense(model, train, val, cfg, out, progress=progress, device=args.device,
                                log=(lambda text: print(text, file=sys.stderr)) if progress else (lambda text: None))
    report.update(model=name, data=args.data, command=command_line(args))
    emit(args, report, f"{model.dense.task} model on {val.name} ({len(val)} images), whole model timed\n"
                       f"{stage_table(report)}\n\nartefacts and report.{{json,md,png}} in {out}")


# ---------------------------------------------------------------- coco-synthetic

def cmd_coco_synthetic(args: argparse.Namespace) -> None:
    """``vitrim coco-synthetic``: a COCO-format set of Fashion-MNIST items on canvases."""
    from vitrim.data import load_fashion_mnist
    from vitrim.data.coco import write_synthetic_coco
    from vitrim.fsutil import check_output_dir

    out = check_output_dir(args.out, "--out directory")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise ConfigError(f"--out {out} exists and is not empty; choose another directory or pass --force to "
                          f"replace it")
    source = load_fashion_mnist("train", args.data_dir)
    write_synthetic_coco(out, source, train=args.train, val=args.val, canvas=args.canvas, items=tuple(args.items),
                         scales=tuple(args.scales), seed=args.seed)
    print(f"wrote {out}: {args.train} train and {args.val} val images of {args.canvas}x{args.canvas}, "
          f"{len(source.class_names)} categories (annotations/instances_{{train,val}}.json)")


def _pair(kind: type) -> Any:
    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected LOW,HIGH numbers, got {text!r}") from None
        if len(values) != 2 or not 0 < values[0] <= values[1]:
            raise argparse.ArgumentTypeError(f"expected LOW,HIGH with 0 < LOW <= HIGH, got {text!r}")
        return values

    return parse


def add_synthetic_parser(sub: Any) -> None:
    """The ``coco-synthetic`` sub-command; its defaults are :func:`write_synthetic_coco`'s."""
    from vitrim.cli_common import positive_int, seed_int
    from vitrim.data.coco import write_synthetic_coco

    def d(name: str) -> Any:
        return default_of(write_synthetic_coco, name)

    p = sub.add_parser("coco-synthetic", help="write a COCO-format detection/segmentation set of Fashion-MNIST items",
                       description="Write DIR/annotations/instances_{train,val}.json and DIR/{train,val}/*.png: real "
                                   "Fashion-MNIST items (boxes and RLE masks) at several scales on canvases with "
                                   "clutter, for vitrim train/eval/prune --data coco:DIR.")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--train", type=positive_int, default=d("train"), help="training images")
    p.add_argument("--val", type=positive_int, default=d("val"), help="validation images")
    p.add_argument("--canvas", type=positive_int, default=d("canvas"), help="canvas height = width in pixels (>= 28)")
    p.add_argument("--items", type=_pair(int), default=list(d("items")), metavar="MIN,MAX",
                   help=f"items per canvas (default: {','.join(map(str, d('items')))})")
    p.add_argument("--scales", type=_pair(float), default=list(d("scales")), metavar="LOW,HIGH",
                   help=f"item size relative to 28 pixels (default: {','.join(f'{s:g}' for s in d('scales'))})")
    p.add_argument("--seed", type=seed_int, default=d("seed"))
    p.add_argument("--data-dir", default=None, help="directory holding the Fashion-MNIST IDX files")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out directory")
    p.set_defaults(func=cmd_coco_synthetic)


def add_coco_args(p: argparse.ArgumentParser, task: bool = False) -> None:
    """``--train-split``/``--val-split`` for ``--data coco:DIR`` (and ``--task`` for ``train``)."""
    from vitrim.models.dense import TASKS

    if task:
        p.add_argument("--task", choices=list(TASKS), default=None,
                       help="train a dense model on --data coco:DIR: a semantic segmenter or a CenterNet-style "
                            "detector on --init's (or the preset's) backbone, at the data's image size; dense "
                            "defaults: --batch-size 32, --lr 5e-4, no augmentation")
    g = p.add_argument_group("COCO data (--data coco:DIR)")
    g.add_argument("--train-split", default=None, metavar="NAME",
                   help="training split: DIR/annotations/instances_NAME.json, images in DIR/NAME/ "
                        "(default: train or train2017, whichever exists)")
    g.add_argument("--val-split", default=None, metavar="NAME",
                   help="validation split (default: val or val2017, whichever exists)")


# ---------------------------------------------------------------- train

def _recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The training settings typed on the command line; the others take the dense defaults."""
    from vitrim.dense.train import DENSE_DEFAULTS

    given = {token.split("=")[0].lstrip("-").replace("-", "_") for token in getattr(args, "argv", [])
             if token.startswith("--")}
    settings = {key: getattr(args, attr) for key, attr in TRAIN_RECIPE.items()
                if key not in DENSE_DEFAULTS or key in given}
    if "augment" in given or "no_augment" in given:
        settings["augment"] = "none" if args.no_augment else args.augment
    return {**settings, "limit_train": args.limit}


def _start_model(args: argparse.Namespace) -> Any:
    """``--init``'s dense model to fine-tune (pruned, say), or the ViT to build one on: ``--init``'s
    or the ``--model`` preset's, at ``--image-size``."""
    from vitrim.cli_common import resolve_model, training_model
    from vitrim.models import VisionTransformer

    if args.init:
        init = resolve_model(args.init)[0]
        if is_dense(init):
            if init.dense.task != args.task:
                raise ConfigError(f"--init {args.init} is a {init.dense.task} model; fine-tune it with --task "
                                  f"{init.dense.task}, or start --task {args.task} from a classifier")
            return init
    backbone = training_model(args)
    if not isinstance(backbone, VisionTransformer):
        raise ConfigError(f"--init {args.init} is a {type(backbone).__name__}; start from a classifier or backbone ViT")
    return backbone


def cmd_train_dense(args: argparse.Namespace) -> None:
    """``vitrim train --task segment|detect --data coco:DIR``: a dense model on --init's backbone."""
    import vitrim
    from vitrim.data.coco import find_split, split_image_size
    from vitrim.dense.train import dense_train_config, fit_dense
    from vitrim.distributed import barrier, is_main, main_lock
    from vitrim.fsutil import check_output_dir
    from vitrim.models.dense import DenseHeadConfig, DenseModel
    from vitrim.train.loop import CHECKPOINT_DIR

    root = coco_root(args)
    if args.task is None:
        raise ConfigError(f"{args.data} is detection/segmentation data; pass --task segment or --task detect")
    if args.arch != "vit" or args.teacher:
        raise ConfigError("--task trains a dense model on a plain ViT backbone; drop --arch and --teacher")
    cfg = dense_train_config(**_recipe(args))
    out = check_output_dir(args.out, "--out directory")
    if args.resume and not (out / CHECKPOINT_DIR).is_dir():
        raise ConfigError(f"--resume: {out} holds no {CHECKPOINT_DIR}/; start without --resume")
    split = find_split(root, "train", args.train_split)
    if args.image_size is None:
        args.image_size = split_image_size(root, split)
        if args.image_size is None:
            raise DataError(f"the images of {root}/{split} differ in size or are not square; pass --image-size N "
                            f"(they are resized to N x N)")
    torch.manual_seed(args.seed)
    start = _start_model(args)
    args.limit = None  # the training split is cut by cfg.limit_train
    train = load_split(args, "train", start)
    head = DenseHeadConfig(num_classes=len(train.class_names) + (args.task == "segment"), task=args.task)
    model = start if is_dense(start) else DenseModel(start, head)
    val = None if args.no_eval else load_split(args, "val", model)
    command = command_line(args)
    with main_lock(out), threads(args.threads):
        result = fit_dense(model, train, cfg, out, val=val, resume=args.resume, locked=True, device=args.device)
        if is_main():
            vitrim.save(result.model.cpu(), out, carry=[CHECKPOINT_DIR], locked=True, extra={"training": {
                "command": command, "config": cfg.to_dict(), "history": result.history, "data": args.data,
                "class_names": train.class_names}})
        barrier()
    final = result.history[-1]
    scores = "".join(f", {k} {final[k]:.4f}" for k in ("val_map", "val_ap50", "val_miou", "val_pixel_accuracy")
                     if k in final)
    print(f"saved {out}  ({args.task}, epoch {final['epoch']}, train loss {final['train_loss']:.4f}{scores})")


# ---------------------------------------------------------------- eval

def metrics_text(metrics: dict[str, float], short: bool = False) -> str:
    """COCO box AP figures, or mIoU and pixel accuracy, on one line (``short``: mAP and AP50 only)."""
    if "map" in metrics and short:
        return f"mAP {metrics['map'] * 100:.2f}  AP50 {metrics['ap50'] * 100:.2f}"
    if "map" in metrics:
        return (f"mAP@[.5:.95] {metrics['map'] * 100:.2f}  AP50 {metrics['ap50'] * 100:.2f}  AP75 "
                f"{metrics['ap75'] * 100:.2f}  AP small/medium/large {metrics['ap_small'] * 100:.2f}/"
                f"{metrics['ap_medium'] * 100:.2f}/{metrics['ap_large'] * 100:.2f}")
    return f"mIoU {metrics['miou'] * 100:.2f}%  pixel accuracy {metrics['pixel_accuracy'] * 100:.2f}%"


def cmd_eval_dense(args: argparse.Namespace) -> None:
    """``vitrim eval DENSE --data coco:DIR``: COCO mAP (detect) or mIoU / pixel accuracy (segment)."""
    from vitrim.adapters import family_of
    from vitrim.adapters.sources import load_model
    from vitrim.dense.train import check_classes, evaluate_dense

    coco_root(args)
    model = load_model(args.model, require_trained=True).model  # in its family's class
    if family_of(model) == "hf-yolos":
        return eval_yolos(args, model)
    require_dense(model, args.model, "eval")
    data = load_split(args, "train" if args.split == "train" else "val", model)
    check_classes(model, data)
    with threads(args.threads):
        metrics = evaluate_dense(model, data, args.batch_size, device=args.device)
    result = {"model": args.model, "task": model.dense.task, "data": args.data, "split": data.name,
              "count": len(data), **metrics}
    emit(args, result, f"{args.model} ({model.dense.task}) on {data.name}: {metrics_text(metrics)}  "
                       f"({len(data)} images)")


def eval_yolos(args: argparse.Namespace, model: Any) -> None:
    """``vitrim eval YOLOS --data coco:DIR``: COCO box metrics of a ``YolosForObjectDetection``."""
    from vitrim.adapters import to_canonical
    from vitrim.adapters.families.yolos import evaluate_yolos

    data = load_split(args, "train" if args.split == "train" else "val", to_canonical(model))
    with threads(args.threads):
        metrics = evaluate_yolos(model, data, args.batch_size, device=args.device)
    result = {"model": args.model, "task": "detect (YOLOS)", "data": args.data, "split": data.name,
              "count": len(data), **metrics}
    emit(args, result, f"{args.model} (YOLOS) on {data.name}: {metrics_text(metrics)}  ({len(data)} images)")


# ---------------------------------------------------------------- tokens

def cmd_tokens_dense(args: argparse.Namespace, model: Any) -> None:
    """``vitrim tokens DENSE --data coco:DIR``: the task metric, FLOPs and whole-model speed-up per
    knob value, the reduced tokens restored to the full grid for the head (merge, then unmerge)."""
    from vitrim.bench.latency import unstable_warning
    from vitrim.bench.token_sweep import speedup_columns
    from vitrim.dense.tokens import DENSE_BATCHES, dense_token_sweep
    from vitrim.dense.train import check_classes
    from vitrim.distributed import is_main
    from vitrim.report import format_table
    from vitrim.tokens import reduce_tokens

    knob = "tau" if args.mode == "dynamic" else "keep"
    values = args.sweep or [args.tau if knob == "tau" else args.keep]
    view = reduce_tokens(model.backbone, args.method, layers=args.layers, mode=args.mode)
    val = None
    if not args.no_eval:
        val = load_split(args, "val", model)
        check_classes(model, val)
    batches = args.batch or list(DENSE_BATCHES)
    with threads(args.threads):
        rows, dense = dense_token_sweep(model, view, knob, values, val=val, batch_sizes=batches,
                                        threads=args.threads, runs=args.runs, device=args.device)
    if not is_main():  # under torchrun rank 0 prints
        return
    cells, figures = speedup_columns(knob, rows, dense["latency"], batches)
    table = [[f"{r[knob]:g}", metrics_text(r["metrics"], short=True) if "metrics" in r else "-",
              f"{r['backbone_flops_ratio']:.3f}", f"{r['flops_ratio']:.3f}"] + speedups
             for r, speedups in zip(rows, cells)]
    header = [knob, "metrics", "backbone FLOPs kept", "model FLOPs kept"] + [f"speedup b={b}" for b in batches]
    base = f"unreduced: {metrics_text(dense['metrics'], short=True)}\n" if dense["metrics"] else ""
    emit(args, {"model": args.model, "task": model.dense.task, "method": view.method, "mode": args.mode,
                "layers": list(view.layers), "dense": dense, "rows": rows},
         f"{model.dense.task} model, {view.method} ({args.mode}) at layers {list(view.layers)}, tokens restored to "
         f"the full grid for the head\n{base}" + format_table(table, header) + unstable_warning(figures))


# ---------------------------------------------------------------- prune

def prune_dense_into(args: argparse.Namespace, cfg: Any, name: str, model: Any, out: Path) -> None:
    """``vitrim prune DENSE --data coco:DIR``: the backbone pruned by the task loss (distilled from the
    dense model's feature map and outputs with ``--recover kd``), whole-model FLOPs."""
    from vitrim.dense.prune import prune_dense
    from vitrim.dense.train import check_classes

    from vitrim.adapters import family_of

    if family_of(model) == "hf-yolos":
        return prune_yolos_into(args, cfg, name, model, out)
    coco_root(args)
    require_dense(model, name, "prune")
    train = load_split(args, "train", model)
    check_classes(model, train)
    options = _prune_options(args, cfg, train)
    progress = not args.json
    with threads(args.threads):
        pruned, result = prune_dense(model, cfg.target, train, progress=progress, device=args.device,
                                     log=(lambda text: print(text, file=sys.stderr)) if progress else None,
                                     **options)
        pruned.cpu()
        val = None if args.no_eval else load_split(args, "val", model)
        report = prune_report(args, name, train, result, {"dense": model, "pruned": pruned}, val)
    _save_pruned(pruned, out, report, model.config)
    emit(args, report, f"{prune_table(report)}\n\n{_plan(model, pruned)}\n\nsaved the pruned model to {out} and the "
                       f"report to {out / 'report'}")


def _prune_options(args: argparse.Namespace, cfg: Any, train: Any) -> dict[str, Any]:
    """The :class:`~vitrim.prune.PruneConfig` fields ``vitrim prune`` passes on for dense models."""
    options = {"exclude": cfg.exclude, "saliency": cfg.saliency, "steps": cfg.steps, "round_to": cfg.round_to,
               "recover": cfg.recover, "seed": cfg.seed, "latency_batch": cfg.latency_batch,
               "latency_corrections": cfg.latency_corrections, "calib_images": min(cfg.calib_images, len(train))}
    if args.structures:
        options["structures"] = cfg.structures
    options.update({name: getattr(cfg, name) for name in ("kd_alpha", "kd_augment") if getattr(cfg, name) is not None})
    if cfg.distils:  # the dense model's feature map and head outputs
        options.update(kd_epochs=cfg.kd_epochs, kd_images=cfg.kd_images, kd_lr=cfg.kd_lr)
    return options


def prune_yolos_into(args: argparse.Namespace, cfg: Any, name: str, model: Any, out: Path) -> None:
    """``vitrim prune YOLOS --data coco:DIR``: a ``YolosForObjectDetection`` pruned by its own
    Hungarian-matched loss on the training split, the detection heads kept, saved in its class."""
    import vitrim
    from vitrim.adapters import to_canonical
    from vitrim.adapters.families.yolos import prune_yolos
    from vitrim.bench.flops import model_cost
    from vitrim.data.coco import find_split, load_coco
    from vitrim.distributed import barrier, is_main
    from vitrim.fsutil import write_json
    from vitrim.prune.report import dimension_plan, plan_table

    root = coco_root(args)
    dense_cfg = to_canonical(model).config
    train = load_coco(root, find_split(root, "train", args.train_split), dense_cfg.image_size, dense_cfg.in_chans)
    progress = not args.json
    with threads(args.threads):
        result = prune_yolos(model, cfg.target, train, progress=progress, device=args.device,
                             log=(lambda text: print(text, file=sys.stderr)) if progress else None,
                             **_prune_options(args, cfg, train))
    pruned = result.model.cpu()
    pruned_cfg = to_canonical(pruned).config
    report = {"model": name, "task": "detect (YOLOS, its own loss)", "data": args.data, "calibration": train.name,
              "metric": result.metric, "kept_ratio": result.kept_ratio, "config": result.config.to_dict(),
              "command": command_line(args),
              "dense": {"backbone_flops": model_cost(dense_cfg).flops, "dimension_plan": dimension_plan(dense_cfg)},
              "pruned": {"backbone_flops": model_cost(pruned_cfg).flops, "dimension_plan": dimension_plan(pruned_cfg)}}
    if is_main():
        vitrim.save(pruned, out, locked=True,
                    add_files=lambda tmp: write_json(tmp / "report" / "report.json", report),
                    extra={"pruning": {"command": report["command"], "base": name, "config": report["config"],
                                       "kept_ratio": report["kept_ratio"]}})
    barrier()
    emit(args, report, f"{name} (YOLOS) pruned by its detection loss: backbone {cfg.metric} kept "
                       f"{result.kept_ratio:.3f}\n\n{plan_table(dense_cfg, pruned_cfg)}\n\nsaved the pruned "
                       f"{type(pruned).__name__} to {out} and the report to {out / 'report'}")


def prune_report(args: argparse.Namespace, name: str, train: Any, result: Any, models: dict[str, Any],
                 val: Any) -> dict[str, Any]:
    """Settings, then per model (dense, pruned) its FLOPs, params, val metrics and dimension plan."""
    from vitrim.dense.cost import dense_cost
    from vitrim.dense.train import evaluate_dense
    from vitrim.prune.report import dimension_plan

    report: dict[str, Any] = {"model": name, "task": models["dense"].dense.task, "data": args.data,
                              "calibration": train.name, "metric": result.metric, "kept_ratio": result.kept_ratio,
                              "config": result.config.to_dict(), "steps": result.steps, "command": command_line(args)}
    for key, net in models.items():
        entry: dict[str, Any] = dense_cost(net)
        if val is not None:
            entry.update(evaluate_dense(net, val, device=args.device))
        entry["dimension_plan"] = dimension_plan(net.config)
        report[key] = entry
    return report


def prune_table(report: dict[str, Any]) -> str:
    """Dense vs pruned: backbone and whole-model FLOPs, params, the task's metrics."""
    from vitrim.report import format_table, human

    dense, pruned = report["dense"], report["pruned"]
    rows = []
    for key, label in (("backbone_flops", "backbone FLOPs"), ("flops", "whole-model FLOPs"),
                       ("backbone_params", "backbone params"), ("params", "whole-model params")):
        rows.append([label, human(dense[key]), human(pruned[key]), f"{pruned[key] / dense[key]:.3f}"])
    for key in ("map", "ap50", "miou", "pixel_accuracy"):
        if key in dense:
            rows.append([key, f"{dense[key] * 100:.2f}", f"{pruned[key] * 100:.2f}",
                         f"{(pruned[key] - dense[key]) * 100:+.2f}"])
    return format_table(rows, ["", "dense", "pruned", "ratio / change"])


def _plan(model: Any, pruned: Any) -> str:
    from vitrim.prune.report import plan_table

    return plan_table(model.config, pruned.config)


def _save_pruned(pruned: Any, out: Path, report: dict[str, Any], dense_config: Any) -> None:
    import vitrim
    from vitrim.distributed import barrier, is_main
    from vitrim.fsutil import write_json, write_text
    from vitrim.prune.report import plan_table

    def add_files(tmp: Path) -> None:
        write_json(tmp / "report" / "report.json", report)
        write_text(tmp / "report" / "report.md", f"# {report['model']} pruned by its {report['task']} loss\n\n"
                   f"`{report['command']}`\n\n```\n{prune_table(report)}\n\n"
                   f"{plan_table(dense_config, pruned.config)}\n```\n")

    if is_main():
        vitrim.save(pruned, out, locked=True, add_files=add_files, extra={"pruning": {
            "command": report["command"], "base": report["model"], "config": report["config"],
            "kept_ratio": report["kept_ratio"]}})
    barrier()


# ---------------------------------------------------------------- bench

def bench_models(models: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """``bench --backbone``: each dense model's backbone alone (up to the feature map its head reads)."""
    from vitrim.dense.cost import BackboneOnly

    if not getattr(args, "backbone", False):
        return models
    for spec, model in models.items():
        if not is_dense(model):
            raise ConfigError(f"--backbone times a dense model's backbone; {spec} is a {type(model).__name__}")
    return {spec: BackboneOnly(model) for spec, model in models.items()}


def dense_figures(models: dict[str, Any], results: dict[str, Any]) -> str:
    """Dense models' whole-model FLOPs (backbone + pyramid + head) into ``results``; a note for the table."""
    from vitrim.dense.cost import BackboneOnly, dense_cost
    from vitrim.report import human

    notes = []
    for spec, model in models.items():
        if is_dense(model):
            cost = dense_cost(model)
            results[spec].update(flops=cost["flops"], backbone_flops=cost["backbone_flops"],
                                 head_flops=cost["head_flops"], timed="whole dense model")
            notes.append(f"{spec}: whole {model.dense.task} model, FLOPs {human(cost['backbone_flops'])} backbone + "
                         f"{human(cost['head_flops'])} pyramid and head (--backbone times the backbone alone)")
        elif isinstance(model, BackboneOnly):
            results[spec]["timed"] = "backbone"
            notes.append(f"{spec}: the backbone alone, up to the feature map the head reads")
    return "".join(f"\n{n}" for n in notes)


def add_bench_args(p: argparse.ArgumentParser) -> None:
    """``bench --backbone``."""
    p.add_argument("--backbone", action="store_true",
                   help="dense models (vitrim train --task): time the backbone alone, not the whole model")
