"""The ``vitrim`` command line: parses, calls the library, prints.

Every default comes from the library (:func:`~vitrim.cli_common.default_of` on the dataclass or
function that owns it); models come from :func:`vitrim.adapters.sources.load_model`.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

from vitrim.cli_common import (Parser, add_data_args, add_device, add_json, add_onnx_input_args, add_pretrained,
                               add_threads, augment_spec, check_batch_options, command_line, data_for_family,
                               default_of, emit, keep_range, load_data_for, non_negative_float, number, parse_floats, parse_ints,
                               positive_float, positive_int, resolve_model, resolve_runnable, seed_int,
                               train_and_test, unit_float)
from vitrim.cli_common import TOKENS_TRAIN_KEEP, training_model
from vitrim.cli_common import threads as _threads
from vitrim.distributed import barrier, is_main, main_lock
from vitrim.errors import ConfigError, VitrimError

__all__ = ["build_parser", "main", "parse_floats", "parse_ints", "positive_int"]
DEFAULT_MODEL = "fmnist-vit"
DEFAULT_BATCHES = [1, 64]


def cmd_models(args: argparse.Namespace) -> None:
    """``vitrim models``: the presets, their size and whether weights ship."""
    from vitrim.bench.flops import model_cost
    from vitrim.models import PRESETS
    from vitrim.report import format_table, human

    rows = []
    for name, preset in sorted(PRESETS.items()):
        cost = model_cost(preset.build())
        rows.append([name, human(cost.params), human(cost.flops), "yes" if preset.weights_dir() else "no",
                     preset.description])
    print(format_table(rows, ["preset", "params", "FLOPs", "weights", "description"]))


def cmd_eval(args: argparse.Namespace) -> None:
    """``vitrim eval``: top-1 accuracy and loss of a model (torch, ONNX or integer-only)."""
    from vitrim.adapters import head_kind
    from vitrim.adapters.native import NativeModel
    from vitrim.bench import evaluate
    from vitrim.bench.accuracy import limiting_part
    from vitrim.cli_dense import cmd_eval_dense, is_coco, refuse_dense

    if is_coco(args.data):
        return cmd_eval_dense(args)
    model, _ = resolve_runnable(args)
    refuse_dense(model, args)
    family = model.family if isinstance(model, NativeModel) else "vitrim"
    if isinstance(model, NativeModel) and head_kind(model.model) != "classifier":
        raise ConfigError(f"{args.model} is a {type(model.model).__name__} without a classifier; eval needs "
                          f"class logits (bench, analyze and prune take backbones)")
    data = data_for_family(model, args, args.split, family)
    with _threads(args.threads):
        metrics = evaluate(model, data, batch_size=args.batch_size, image_size=model.config.image_size,
                           progress=not args.json, device=args.device)
    result = {"model": args.model, "data": args.data, "split": args.split, **metrics}
    emit(args, result, f"{args.model} on {args.data}/{args.split}: top-1 accuracy "
                       f"{metrics['accuracy'] * 100:.2f}%  loss {metrics['loss']:.4f}  ({metrics['count']} images)\n"
                       f"{limiting_part(metrics)}")


def bench_text(name: str, result: dict[str, Any]) -> str:
    """One model's ``vitrim bench`` table."""
    from vitrim.report import format_table, human

    rows = []
    for batch, entry in result["latency"].items():
        mem = entry.get("peak_activation_bytes")
        rows.append([batch, f"{entry['median_ms']:.2f}", f"{entry['p10_ms']:.2f}-{entry['p90_ms']:.2f}",
                     f"{entry['images_per_s']:.0f}", human(mem, "B") if mem is not None else "n/a"])
    flops = f"{human(result['flops'])}FLOPs" if result["flops"] is not None else "unknown FLOPs"
    where = result.get("device", {})
    head = (f"{name}: {human(result['params'])} params, {flops} per image, "
            f"threads={result['threads'] or torch.get_num_threads()}, {where.get('device', 'cpu')} "
            f"({where.get('name', '?')}), {where.get('dtype', '?')}")
    return head + "\n" + format_table(rows, ["batch", "median ms", "p10-p90 ms", "images/s", "peak act. mem"])


def cmd_bench(args: argparse.Namespace) -> None:
    """``vitrim bench``: params, FLOPs, latency and memory of one or more models, timed interleaved."""
    from vitrim.bench.any_model import measure_all
    from vitrim.bench.latency import choose_threads, unstable_warning
    from vitrim.cli_dense import bench_models, dense_figures
    from vitrim.report import format_table

    specs = args.model if isinstance(args.model, list) else [args.model]
    if len(set(specs)) != len(specs):
        raise ConfigError(f"a model is named twice in {' '.join(specs)}; name each model once")
    choice = choose_threads(args.threads)  # one count for every model, ORT sessions included
    models, weights = {}, {}
    for spec in specs:
        models[spec], weights[spec] = resolve_runnable(
            argparse.Namespace(**{**vars(args), "model": spec, "threads": choice.threads}), allow_random=True)
    batches = args.batch or DEFAULT_BATCHES
    models = bench_models(models, args)  # --backbone: dense models' backbones alone
    results = measure_all(models, batches, threads=choice, runs=args.runs, device=args.device)  # interleaved
    for spec in specs:
        results[spec].update(model=spec, weights=weights[spec])
    notes = dense_figures(models, results)  # dense models: whole-model FLOPs
    text = "\n\n".join(bench_text(spec, results[spec]) for spec in specs) + notes
    if len(specs) > 1:
        rows = [[spec] + [f"{results[spec]['latency'][str(b)]['speedup']:.2f}x" for b in batches] for spec in specs]
        text += f"\n\nspeed-up against {specs[0]} (timed interleaved)\n" + \
            format_table(rows, ["model"] + [f"b={b}" for b in batches])
    text += unstable_warning((spec, b, e) for spec in specs for b, e in results[spec]["latency"].items())
    data = results[specs[0]] if len(specs) == 1 else {"models": specs, "reference": specs[0], "threads": choice.threads,
                                                      "thread_policy": choice.to_dict(), "results": results}
    emit(args, data, text)


def cmd_analyze(args: argparse.Namespace) -> None:
    """``vitrim analyze``: the params / FLOPs / latency share of each component."""
    from vitrim.bench import analyze
    from vitrim.report import format_table, human

    model, _ = resolve_model(args.model, allow_random=True, pretrained=args.pretrained)
    check_batch_options(model, args)
    rows = analyze(model, batch_size=args.batch, threads=args.threads, runs=args.runs)
    table = [[r["component"], human(r["params"]), f"{r['params_share'] * 100:.1f}%", human(r["flops"]),
              f"{r['flops_share'] * 100:.1f}%", f"{r['latency_ms']:.3f}", f"{r['latency_share'] * 100:.1f}%"]
             for r in rows]
    text = format_table(table, ["component", "params", "share", "FLOPs", "share", "ms", "share"])
    emit(args, {"model": args.model, "batch": args.batch, "components": rows},
         f"{args.model}, batch {args.batch}\n{text}")


def cmd_train(args: argparse.Namespace) -> None:
    """``vitrim train``: train (or distil, or fine-tune for tokens / iret) and save the model."""
    import vitrim
    from vitrim.cli_dense import cmd_train_dense, is_coco
    from vitrim.fsutil import check_output_dir
    from vitrim.train import TrainConfig, fit
    from vitrim.train.loop import CHECKPOINT_DIR, check_teacher

    if args.task or is_coco(args.data):
        return cmd_train_dense(args)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
                      weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                      label_smoothing=args.label_smoothing, augment="none" if args.no_augment else args.augment,
                      seed=args.seed, precision=args.precision, distill_alpha=args.distill_alpha,
                      distill_temperature=args.distill_temperature, limit_train=args.limit)
    out = check_output_dir(args.out, "--out directory")
    if args.resume and not (out / CHECKPOINT_DIR).is_dir():
        raise ConfigError(f"--resume: {out} holds no {CHECKPOINT_DIR}/; start without --resume")
    torch.manual_seed(args.seed)
    model = training_model(args)
    check_batch_options(model, args)
    teacher = resolve_model(args.teacher)[0] if args.teacher else None
    if teacher is not None and teacher.config.image_size != model.config.image_size:
        from vitrim.models.resize import InputResized

        teacher = InputResized(teacher)  # distils at its own input size
    check_teacher(model, teacher)
    args.limit = None  # --limit applies to the training split only
    train_set = load_data_for(model, args, "train")
    test_set = None if args.no_eval else load_data_for(model, args, "test")
    command = command_line(args)
    with main_lock(out), _threads(args.threads):
        result = fit(model, train_set, cfg, out, test_set=test_set, teacher=teacher, resume=args.resume,
                     image_size=model.config.image_size, locked=True, device=args.device)
        if is_main():
            vitrim.save(result.model.cpu(), out, extra={"training": {"command": command, "config": cfg.to_dict(),
                                                                     "history": result.history}},
                        carry=[CHECKPOINT_DIR], locked=True)
        barrier()
    final = result.history[-1]
    print(f"saved {out}  (epoch {final['epoch']}, train loss {final['train_loss']:.4f}"
          + (f", test accuracy {final['test_accuracy'] * 100:.2f}%" if "test_accuracy" in final else "") + ")")


def cmd_prune(args: argparse.Namespace) -> None:
    """``vitrim prune``: prune a model in its own family, report dense vs pruned, save it."""
    from vitrim.adapters.sources import load_model
    from vitrim.cli_dense import is_coco, is_dense, prune_dense_into
    from vitrim.fsutil import check_output_dir
    from vitrim.prune import PruneConfig

    cfg = PruneConfig(target=args.target, structures=args.structures, exclude=tuple(args.exclude or ()),
                      saliency=args.saliency, calib_images=args.calib, steps=args.steps, round_to=args.round_to,
                      recover=args.recover, kd_epochs=args.epochs, kd_images=args.kd_images, kd_lr=args.kd_lr,
                      kd_alpha=args.kd_alpha, kd_augment=args.kd_augment, step_kd_images=args.step_kd_images,
                      latency_batch=args.latency_batch, latency_corrections=args.latency_corrections, seed=args.seed,
                      objective=args.objective)
    name = args.model or DEFAULT_MODEL
    loaded = load_model(name, pretrained=args.pretrained, allow_random=True)
    out = check_output_dir(args.out or f"runs/{loaded.spec.stem}-{cfg.metric}{cfg.ratio:g}", "--out directory")
    with main_lock(out):  # a second run to the same --out is refused now, not after its work
        if is_coco(args.data) or is_dense(loaded.model):
            return prune_dense_into(args, cfg, name, loaded.model, out)
        _prune_into(args, cfg, name, loaded, out)


def _prune_into(args: argparse.Namespace, cfg: Any, name: str, loaded: Any, out: Path) -> None:
    from vitrim.adapters import family_of, to_canonical
    from vitrim.prune.report import plan_table, summary_table
    from vitrim.pruning import prune_and_save

    original = loaded.model  # pruned in its own family, saved as that family's class
    family = family_of(original) or "vitrim"
    model = to_canonical(original)
    check_batch_options(model, args)
    train_set, test_set = prune_data(model, args, family)
    progress = not args.json
    with _threads(args.threads):
        report, pruned = prune_and_save(
            original, cfg, train_set, test_set, out, name=name, weights=loaded.weights, command=command_line(args),
            threads=args.threads, runs=args.runs, progress=progress,
            log=(lambda text: print(text, file=sys.stderr)) if progress else None, device=args.device)
    if not is_main():
        return  # rank 0 reports
    text = (f"{summary_table(report)}\n\n{plan_table(model.config, pruned.config)}\n\n"
            f"saved the pruned model to {out} and the report to {out / 'report'}")
    emit(args, report, text)


def prune_data(model: Any, args: argparse.Namespace, family: str) -> tuple[Any, Any]:
    """Calibration/training images and test images (None: no evaluation) for ``vitrim prune``."""
    if args.data == "random":
        from vitrim.adapters.random_data import pseudo_labelled

        # the labels are the dense model's own predictions: accuracy against them means nothing
        return pseudo_labelled(model, args.calib, seed=args.seed), None
    train_set, _ = train_and_test(model, args, family, test=False)
    test = not args.no_eval and train_set.labelled  # unlabelled images: no accuracy to measure
    return train_set, data_for_family(model, args, "test", family) if test else None


def cmd_tokens(args: argparse.Namespace) -> None:
    """``vitrim tokens``: accuracy, FLOPs and speed-up of token reduction per knob value."""
    from vitrim.bench.latency import unstable_warning
    from vitrim.bench.token_sweep import reduced_view, speedup_columns, token_sweep
    from vitrim.report import format_table

    from vitrim.cli_dense import cmd_tokens_dense, dense_model, is_coco, is_dense, refuse_dense

    if is_coco(args.data):
        return cmd_tokens_dense(args, dense_model(args.model or DEFAULT_MODEL, "tokens", pretrained=args.pretrained))
    model, _ = resolve_model(args.model or DEFAULT_MODEL, allow_random=args.no_eval, pretrained=args.pretrained)
    if is_dense(model) and args.no_eval:
        return cmd_tokens_dense(args, model)
    refuse_dense(model, args)
    check_batch_options(model, args)
    knob = "tau" if args.mode == "dynamic" else "keep"
    values = args.sweep or [args.tau if knob == "tau" else args.keep]
    model, reduced, args.method = reduced_view(model, args.method, args.layers, args.mode)
    for value in values:  # validate every knob value before any work
        setattr(reduced, knob, value)
    test_set = None if args.no_eval else load_data_for(model, args, "test")
    batches = args.batch or DEFAULT_BATCHES
    with _threads(args.threads):
        rows, dense_latency = token_sweep(model, reduced, knob, values, test=test_set, batch_sizes=batches,
                                          threads=args.threads, runs=args.runs, device=args.device)
    if not is_main():  # under torchrun rank 0 times and prints
        return
    cells, figures = speedup_columns(knob, rows, dense_latency, batches)
    table = [[f"{r[knob]:g}", f"{r['accuracy'] * 100:.2f}%" if "accuracy" in r else "-", f"{r['flops_ratio']:.3f}"]
             + speedups for r, speedups in zip(rows, cells)]
    header = [knob, "accuracy", "FLOPs kept"] + [f"speedup b={b}" for b in batches]
    emit(args, {"model": args.model or DEFAULT_MODEL, "method": args.method, "mode": args.mode,
                "layers": list(reduced.layers), "dense_latency": dense_latency, "rows": rows},
         f"{args.method} ({args.mode}) at layers {list(reduced.layers)}\n" + format_table(table, header)
         + unstable_warning(figures))


def cmd_compress(args: argparse.Namespace) -> None:
    """``vitrim compress``: prune, reduce tokens and quantize, with one report."""
    from vitrim.adapters.sources import parse_spec
    from vitrim.compress import CompressConfig, compress, stage_table

    from vitrim.cli_dense import cmd_compress_dense, is_coco, is_dense
    from vitrim.dense.compress import DENSE_TARGET_ERROR

    name = args.model or DEFAULT_MODEL
    model, _ = resolve_model(name, pretrained=args.pretrained)
    dense = is_coco(args.data) or is_dense(model)
    if dense and args.target is not None:  # before the joint search's own checks of the levers given
        raise ConfigError(DENSE_TARGET_ERROR)
    cfg = CompressConfig(prune=_none(args.prune), recover=args.recover, prune_calib=args.prune_calib,
                         tokens=_none(args.tokens), token_method=args.token_method,
                         token_layers=tuple(args.layers) if args.layers else None,
                         quant=_none(args.quant), calib=args.calib,
                         calib_method=args.calib_method, threads=args.threads, runs=args.runs,
                         target=args.target, joint=joint_config(args))
    if dense:
        return cmd_compress_dense(args, cfg, name, model)
    train_set, test_set = train_and_test(model, args)
    out = Path(args.out or f"runs/{parse_spec(name).stem}-compressed")
    progress = not args.json
    with _threads(args.threads):
        report = compress(model, train_set, test_set, cfg, out, progress=progress,
                          log=(lambda text: print(text, file=sys.stderr)) if progress else (lambda text: None),
                          device=args.device)
    report["command"] = command_line(args)
    emit(args, report, f"{stage_table(report)}\n\nartefacts and report.{{json,md,png}} in {out}")


def joint_config(args: argparse.Namespace) -> Any:
    """``compress --target``'s search settings; ``None`` without a target. The levers it chooses
    cannot also be given."""
    from vitrim.compress import CompressConfig
    from vitrim.joint import JointConfig

    if args.target is None:
        return None
    defaults = {"prune": _or_none(default_of(CompressConfig, "prune")),
                "tokens": _or_none(default_of(CompressConfig, "tokens")), "layers": None}
    fixed = [f"--{name}" for name, value in defaults.items() if getattr(args, name) != value]
    if fixed:
        raise ConfigError(f"--target chooses the pruning ratio, the token setting and the precision; drop "
                          f"{', '.join(fixed)} (narrow the choice with --prune-ratios, --keeps, --precisions)")
    grids = {name: getattr(args, name) for name in ("prune_ratios", "keeps", "precisions") if getattr(args, name)}
    return JointConfig(target=args.target, prune_loss=args.prune_loss, eval_images=args.joint_eval,
                       calib=args.joint_calib, batch=args.joint_batch, verify=args.joint_verify,
                       min_seconds=args.joint_seconds, **grids)


def _none(text: str | None) -> str | None:
    """``"none"`` on the command line is ``None`` in the library."""
    return None if text == "none" else text


def _or_none(value: Any) -> str:
    """A library default as the command line spells it (``None`` is ``none``)."""
    return "none" if value is None else value


# ---------------------------------------------------------------- the parser, one function per command

def _model_arg(p: argparse.ArgumentParser, optional: bool = False, extra: str = "") -> None:
    from vitrim.adapters.sources import SPEC_HELP

    if optional:
        p.add_argument("model", nargs="?", default=None, help=SPEC_HELP + f" (default: the bundled {DEFAULT_MODEL})")
    else:
        p.add_argument("model", help=SPEC_HELP + extra)


def add_eval_parser(sub: Any) -> None:
    """The ``eval`` sub-command."""
    from vitrim.bench.accuracy import evaluate
    from vitrim.cli_dense import add_coco_args

    p = sub.add_parser("eval", help="top-1 accuracy and loss on a dataset")
    _model_arg(p)
    add_data_args(p, "evaluate on the first N images only")
    p.add_argument("--split", default="test", choices=["train", "test"],
                   help="with --data coco:DIR, test is the val split (default: test)")
    p.add_argument("--batch-size", type=positive_int, default=default_of(evaluate, "batch_size"))
    add_coco_args(p)
    add_threads(p)
    add_device(p)
    add_json(p)
    add_onnx_input_args(p)
    add_pretrained(p)
    p.set_defaults(func=cmd_eval)


def add_bench_parsers(sub: Any) -> None:
    """The ``bench`` and ``analyze`` sub-commands."""
    from vitrim.bench import analyze, measure
    from vitrim.cli_dense import add_bench_args

    runs = default_of(measure, "runs")
    p = sub.add_parser("bench", help="params, FLOPs, latency and memory")
    p.add_argument("model", nargs="+", help=_spec_help() + "; presets without weights are measured at random init; "
                   "several models are timed interleaved, with speed-ups against the first")
    p.add_argument("--batch", type=positive_int, action="append",
                   help=f"batch size (repeatable; default {' and '.join(map(str, DEFAULT_BATCHES))})")
    p.add_argument("--runs", type=positive_int, default=runs, help="timed runs per batch size (median reported)")
    add_bench_args(p)
    add_threads(p)
    add_device(p)
    add_json(p)
    add_onnx_input_args(p)
    add_pretrained(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("analyze", help="per-block complexity: params, FLOPs and latency shares")
    _model_arg(p)
    p.add_argument("--batch", type=positive_int, default=default_of(analyze, "batch_size"))
    p.add_argument("--runs", type=positive_int, default=default_of(analyze, "runs"))
    add_threads(p)
    add_json(p)
    add_pretrained(p)
    p.set_defaults(func=cmd_analyze)


def _spec_help() -> str:
    from vitrim.adapters.sources import SPEC_HELP

    return SPEC_HELP


def add_prune_parser(sub: Any) -> None:
    """The ``prune`` sub-command; its defaults are :class:`~vitrim.prune.PruneConfig`'s."""
    from vitrim.bench import measure
    from vitrim.cli_dense import add_coco_args
    from vitrim.prune.api import OBJECTIVES, RECOVERY, PruneConfig
    from vitrim.prune.saliency import METHODS
    from vitrim.prune.search import STRUCTURES

    def d(name: str) -> Any:
        return default_of(PruneConfig, name)

    p = sub.add_parser("prune", help="prune a model to a FLOPs or params budget, then recover accuracy")
    _model_arg(p, optional=True)
    p.add_argument("--target", default=d("target"),
                   help="fraction of the cost to keep: flops=0.5, params=0.6 or latency=0.5 (measured on this "
                        "machine; the table is cached)")
    p.add_argument("--latency-batch", type=positive_int, default=d("latency_batch"),
                   help="batch size for latency=... targets")
    p.add_argument("--latency-corrections", type=int, default=d("latency_corrections"),
                   help="latency=...: time the pruned model against dense and prune further, up to this many "
                        "times, while it is over the target (0: trust the latency table's sum)")
    p.add_argument("--recover", choices=list(RECOVERY), default=d("recover"),
                   help="reconstruct: least-squares refit, no training; kd: distillation from the dense model; "
                        "reconstruct+kd: the refit, then distillation")
    p.add_argument("--epochs", type=positive_int, default=d("kd_epochs"), help="distillation epochs for --recover kd")
    p.add_argument("--kd-images", type=positive_int, default=d("kd_images"),
                   help="distil on the first N training images only")
    p.add_argument("--kd-lr", type=positive_float, default=d("kd_lr"))
    p.add_argument("--kd-alpha", type=unit_float, default=d("kd_alpha"),
                   help="the teacher's weight in the distillation, the rest the labels' cross-entropy (default: "
                        "0.5 when the training images carry labels for the model's classes, else 1: the teacher "
                        "alone)")
    p.add_argument("--kd-augment", type=augment_spec, default=d("kd_augment"),
                   help="random transforms of the distillation images: crop, flip, crop,flip or none (default: "
                        "none)")
    p.add_argument("--step-kd-images", type=int, default=d("step_kd_images"),
                   help="distil on this many training images between pruning steps (0: none)")
    p.add_argument("--structures", default=None,
                   help=f"comma-separated kinds that may be pruned (default: {','.join(s.replace('_', '-') for s in STRUCTURES)}; "
                        f"without embed under --objective features, so a backbone keeps its output width)")
    p.add_argument("--objective", choices=list(OBJECTIVES), default=d("objective"),
                   help="labels: classification loss; features: distance to the dense model's output features, no "
                        "labels needed (backbones, or --data folder:DIR of images without class sub-folders); auto: "
                        "features for a model without a classifier or for unlabelled images, else labels")
    p.add_argument("--exclude", action="append", metavar="PATTERN",
                   help="never prune these modules (glob over names like blocks.0.attn, blocks.*.mlp, embed)")
    p.add_argument("--saliency", choices=list(METHODS), default=d("saliency"),
                   help="fisher: 0.5 E[(dl/dg)^2]; taylor: |E[dl/dg]|; taylor2: both terms; magnitude: weight norm")
    p.add_argument("--calib", type=positive_int, default=d("calib_images"),
                   help="calibration images (from the train split)")
    p.add_argument("--steps", type=positive_int, default=d("steps"), help="pruning steps, saliency re-estimated between")
    p.add_argument("--round-to", type=round_to_arg, default=d("round_to"),
                   help="kept dims are multiples of this; auto: the multiple this device's kernels like, measured")
    p.add_argument("--seed", type=seed_int, default=d("seed"))
    add_data_args(p, "evaluate on the first N test images only", random=True)
    p.add_argument("--no-eval", action="store_true", help="skip the accuracy evaluation")
    p.add_argument("--runs", type=positive_int, default=default_of(measure, "runs"),
                   help="timed runs per latency measurement")
    p.add_argument("--out", default=None, help="output directory (default runs/MODEL-METRICRATIO)")
    add_coco_args(p)
    add_threads(p)
    add_device(p)
    add_json(p, "print the report as JSON")
    add_pretrained(p)
    p.set_defaults(func=cmd_prune)


def round_to_arg(text: str) -> int | str:
    """``--round-to``: a positive integer, or ``auto``."""
    return "auto" if text == "auto" else positive_int(text)


def add_tokens_parser(sub: Any) -> None:
    """The ``tokens`` sub-command."""
    from vitrim.bench import measure
    from vitrim.tokens.model import METHODS as TOKEN_METHODS

    p = sub.add_parser("tokens", help="run-time token reduction: accuracy, FLOPs and speed per knob value")
    _model_arg(p, optional=True)
    p.add_argument("--method", choices=list(TOKEN_METHODS), default=None,
                   help="default: the method the model was fine-tuned for (vitrim train --arch tokens), else tome; "
                        "ignored for incremental-resolution models (vitrim train --arch iret), which sweep their own knob")
    p.add_argument("--mode", choices=["static", "dynamic"], default="static",
                   help="static: same count for the whole batch (--keep); dynamic: per-image counts (--tau)")
    p.add_argument("--keep", type=number(0, 1, low_open=True), default=0.7,
                   help="fraction of patch tokens kept at each reduction layer")
    p.add_argument("--tau", type=number(), default=0.9,
                   help="dynamic mode, per image: drop/evit keep this share of the class attention; "
                        "tome merges token pairs whose key similarity exceeds it")
    p.add_argument("--sweep", type=parse_floats, default=None, help="comma-separated knob values to compare")
    p.add_argument("--layers", type=parse_ints, default=None,
                   help="blocks after which tokens are reduced, e.g. 2,4 (default: those the model was fine-tuned "
                        "with, else every depth/3 blocks)")
    add_data_args(p, "evaluate on the first N test images only (val images for coco:DIR)")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--batch", type=positive_int, action="append",
                   help="latency batch sizes (default 1 and 64; 1 and 8 for dense models)")
    p.add_argument("--runs", type=positive_int, default=default_of(measure, "runs"))
    add_threads(p)
    add_device(p)
    add_json(p)
    add_pretrained(p)
    p.set_defaults(func=cmd_tokens)


def add_compress_parser(sub: Any) -> None:
    """The ``compress`` sub-command; its defaults are :class:`~vitrim.compress.CompressConfig`'s."""
    from vitrim.compress import CompressConfig
    from vitrim.prune.api import RECOVERY
    from vitrim.quant.quantize import CALIBRATORS
    from vitrim.tokens.model import METHODS as TOKEN_METHODS

    def d(name: str) -> Any:
        return default_of(CompressConfig, name)

    from vitrim.cli_dense import add_coco_args

    p = sub.add_parser("compress", help="prune, reduce tokens and quantize in one pipeline, with one report "
                                        "(classifiers, detectors and segmenters)")
    _model_arg(p, optional=True)
    p.add_argument("--prune", default=_or_none(d("prune")), help="pruning target, or none")
    p.add_argument("--recover", choices=list(RECOVERY), default=d("recover"))
    p.add_argument("--prune-calib", type=positive_int, default=d("prune_calib"), help="calibration images for pruning")
    p.add_argument("--tokens", default=_or_none(d("tokens")), help="static token reduction keep=RATIO, or none")
    p.add_argument("--token-method", choices=list(TOKEN_METHODS), default=d("token_method"),
                   help="tome merges similar tokens (default: keeps accuracy best without training); "
                        "drop/evit keep the tokens the class token attends to")
    p.add_argument("--layers", type=parse_ints, default=None, help="blocks after which tokens are reduced")
    p.add_argument("--quant", default=_or_none(d("quant")), help="w8a8 | w8-dynamic | w4 | none")
    p.add_argument("--calib", type=positive_int, default=d("calib"), help="calibration images for quantization")
    p.add_argument("--calib-method", choices=list(CALIBRATORS), default=d("calib_method"))
    add_data_args(p, "evaluate on the first N test images only (dense models: val images)")
    add_coco_args(p)
    p.add_argument("--runs", type=positive_int, default=d("runs"))
    add_joint_args(p)
    p.add_argument("--out", default=None, help="output directory (default runs/MODEL-compressed)")
    add_threads(p)
    add_device(p)
    add_json(p)
    add_pretrained(p)
    p.set_defaults(func=cmd_compress)


def add_joint_args(p: argparse.ArgumentParser) -> None:
    """``compress --target`` and the grids its joint search chooses from."""
    from vitrim.joint import PRUNE_LOSSES, JointConfig

    def d(name: str) -> Any:
        return default_of(JointConfig, name)

    def floats(text: str) -> tuple[float, ...]:
        return tuple(float(v) for v in text.split(",") if v.strip())

    p.add_argument("--target", default=None,
                   help="one budget for all three levers: latency=R (of dense torch fp32 eager, measured here) "
                        "or flops=R; chooses the pruning ratio, the token keep ratio and layers, and the "
                        "precision together (then --prune/--tokens/--layers are not given; with flops= the "
                        "precision is --quant)")
    p.add_argument("--prune-ratios", type=floats, default=None,
                   help=f"FLOPs ratios the joint search may prune to (default: {','.join(map(str, d('prune_ratios')))})")
    p.add_argument("--keeps", type=floats, default=None,
                   help=f"token keep ratios it may use (default: {','.join(map(str, d('keeps')))})")
    p.add_argument("--precisions", type=lambda t: tuple(v.strip() for v in t.split(",") if v.strip()),
                   default=None, help=f"precisions it may use (default: {','.join(d('precisions'))})")
    p.add_argument("--prune-loss", choices=list(PRUNE_LOSSES), default=d("prune_loss"),
                   help="measured: each dimension plan's held-out loss after reconstruction; fisher: its Fisher "
                        "estimate (faster, underestimates)")
    p.add_argument("--joint-calib", type=positive_int, default=d("calib"),
                   help="training images for the joint search's saliency, reconstruction and calibration")
    p.add_argument("--joint-eval", type=positive_int, default=d("eval_images"),
                   help="other training images its loss curves are measured on")
    p.add_argument("--joint-batch", type=positive_int, default=d("batch"), help="batch size the latency budget is for")
    p.add_argument("--joint-verify", type=positive_int, default=d("verify"),
                   help="best predicted settings built and timed against dense, until one meets the budget")
    p.add_argument("--joint-seconds", type=non_negative_float, default=d("min_seconds"),
                   help="each timing of a built setting against dense lasts at least this long (more runs, "
                        "a steadier ratio)")


def add_train_parser(sub: Any) -> None:
    """The ``train`` sub-command; the iret defaults are :class:`~vitrim.iret.IretOptions`'s."""
    from vitrim.cli_dense import add_coco_args
    from vitrim.iret import IretOptions
    from vitrim.tokens.model import METHODS as TOKEN_METHODS

    p = sub.add_parser("train", help="train a model (optionally distilling from a teacher)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="preset to train (see `vitrim models`)")
    p.add_argument("--init", default=None, metavar="MODEL",
                   help="start from this trained model (directory or preset with weights) instead of a fresh preset")
    p.add_argument("--arch", choices=["vit", "iret", "tokens"], default="vit",
                   help="iret: the incremental-resolution ViT (coarse tokens, detail where attention looks), "
                        "built from --init or the preset; tokens: fine-tune --init's weights for token reduction "
                        "(--token-method, --layers), saved with that reduction as the model's default")
    p.add_argument("--detail-layer", type=int, default=default_of(IretOptions, "detail_layer"),
                   help="iret: block after which details arrive (0-based)")
    p.add_argument("--lifting", choices=["learned", "haar"],
                   default="learned" if default_of(IretOptions, "learnable") else "haar",
                   help="iret: learn the 2-D lifting filters, or keep the fixed Haar transform")
    p.add_argument("--lifting-kernel", type=positive_int, default=default_of(IretOptions, "kernel"),
                   help="iret: lifting filter length (odd)")
    p.add_argument("--detail-mixer", action="store_true",
                   help="iret: adapt each detail to its token with a small MLP (besides the linear detail embedding)")
    iret_keep = ",".join(f"{v:g}" for v in default_of(IretOptions, "train_keep"))
    tokens_keep = ",".join(f"{v:g}" for v in TOKENS_TRAIN_KEEP)
    p.add_argument("--train-keep", type=keep_range, default=None, metavar="LOW,HIGH",
                   help="iret, tokens: each training batch keeps a random share of patches in this range "
                        f"(default {iret_keep} for iret, {tokens_keep} for tokens)")
    p.add_argument("--sandwich", action="store_true",
                   help="iret, tokens: run half of each training batch at the top of --train-keep")
    p.add_argument("--dense-top", action="store_true",
                   help="iret: at keep=1 give every patch its detail at the embedding, so the top of the knob "
                        "runs as the dense ViT (use with --sandwich)")
    p.add_argument("--token-method", choices=list(TOKEN_METHODS), default="tome",
                   help="tokens: the reduction to fine-tune for")
    p.add_argument("--layers", type=parse_ints, default=None,
                   help="tokens: blocks after which tokens are reduced (default: every depth/3 blocks)")
    add_data_args(p, "train on the first N training images only (quick trials)")
    p.add_argument("--out", required=True, help="output model directory (checkpoints go to OUT/checkpoint)")
    add_recipe_args(p)
    p.add_argument("--teacher", default=None, help="distil from this model (directory or preset with weights)")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="train at this input size: --init's weights with their position embeddings resampled, "
                        "the data resized to it, a teacher fed its own size (e.g. 56 for fmnist-vit at 197 tokens)")
    p.add_argument("--no-eval", action="store_true", help="skip the test-set evaluation after each epoch")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    add_coco_args(p, task=True)
    add_threads(p)
    add_device(p)
    p.set_defaults(func=cmd_train)


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    """The training recipe's options, their defaults :class:`~vitrim.train.TrainConfig`'s."""
    from vitrim.train import TrainConfig
    from vitrim.train.config import PRECISIONS

    def d(name: str) -> Any:
        return default_of(TrainConfig, name)

    p.add_argument("--epochs", type=positive_int, default=d("epochs"))
    p.add_argument("--batch-size", type=positive_int, default=d("batch_size"))
    p.add_argument("--lr", type=positive_float, default=d("lr"))
    p.add_argument("--min-lr", type=non_negative_float, default=d("min_lr"))
    p.add_argument("--weight-decay", type=non_negative_float, default=d("weight_decay"))
    p.add_argument("--warmup-epochs", type=non_negative_float, default=d("warmup_epochs"),
                   help="linear warm-up length (default: 1 epoch, or a tenth of a run shorter than 10 epochs)")
    p.add_argument("--label-smoothing", type=number(0, 1, high_open=True), default=d("label_smoothing"))
    p.add_argument("--drop-path", type=number(0, 1, high_open=True), default=None,
                   help="stochastic depth rate (default: the preset's)")
    p.add_argument("--augment", default=d("augment"), type=augment_spec,
                   help="random transforms of training images: crop (shift by up to 2 pixels), flip (horizontal; "
                        "only for data whose mirror image has the same class), e.g. crop,flip, or none "
                        f"(default: {d('augment')})")
    p.add_argument("--no-augment", action="store_true", help="same as --augment none")
    p.add_argument("--precision", choices=PRECISIONS, default=d("precision"),
                   help="auto: bf16 autocast where the device supports it (CUDA, or a CPU with AVX-512 BF16); "
                        "fp16: autocast with a gradient scaler, for GPUs without bf16")
    p.add_argument("--seed", type=seed_int, default=d("seed"))
    p.add_argument("--distill-alpha", type=unit_float, default=d("distill_alpha"))
    p.add_argument("--distill-temperature", type=positive_float, default=d("distill_temperature"))


def build_parser() -> argparse.ArgumentParser:
    """The ``vitrim`` parser with every sub-command."""
    from vitrim import __version__
    from vitrim.cli_dense import add_synthetic_parser
    from vitrim.quant.cli import register as register_quant

    parser = Parser(prog="vitrim", description="Make Vision Transformers smaller and faster.")
    parser.add_argument("--version", action="version", version=f"vitrim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("models", help="list the model presets").set_defaults(func=cmd_models)
    for add in (add_eval_parser, add_bench_parsers, add_prune_parser, add_tokens_parser, add_compress_parser,
                add_train_parser, add_synthetic_parser, register_quant):
        add(sub)
    for command in sub.choices.values():
        command.add_argument("--verbose", action="store_true",
                             help="print the full trace of errors and the output of the tools vitrim calls")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``vitrim`` with ``argv``; the exit code (2 for bad input, 1 for an internal error)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    from vitrim.quant import deps

    deps.VERBOSE = args.verbose  # per run: the API keeps third-party output quiet
    code = run_command(args)
    from vitrim.distributed import leave

    leave(wait=code == 0)
    return code


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command (under ``torchrun``: on this rank); the exit code, every failure
    turned into one line on the standard error."""
    try:
        join_processes(args)
        args.func(args)
    except VitrimError as exc:
        return fail(args, f"error: {exc}", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        return fail(args, "error: out of memory; use a smaller --batch/--batch-size or fewer images", 2)
    except OSError as exc:  # the disk or the file system refused: full, read-only, permissions
        where = f" {exc.filename}" if exc.filename else ""
        return fail(args, f"error: cannot access{where}: {exc.strerror or exc}", 2)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a trace
        return fail(args, f"internal error: {type(exc).__name__}: {first_line(exc)} (run again with --verbose for "
                          f"the full trace, and report it)", 1)
    return 0


DISTRIBUTED_COMMANDS = ("train", "prune", "tokens", "eval")


def join_processes(args: argparse.Namespace) -> None:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): join the process group on this rank's device, and
    keep the standard output of every rank but 0 quiet; other commands run in one process."""
    import os

    from vitrim.distributed import init_from_env

    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return
    if args.command not in DISTRIBUTED_COMMANDS:
        raise ConfigError(f"vitrim {args.command} runs in one process; launch it without torchrun "
                          f"(torchrun runs {', '.join(DISTRIBUTED_COMMANDS)})")
    args.device = init_from_env(args.device)
    if not is_main():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of this process


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters)."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


def fail(args: argparse.Namespace, message: str, code: int) -> int:
    """Print ``message`` as one line (the trace too with ``--verbose``); return ``code``."""
    if args.verbose:
        traceback.print_exc()
    print(f"vitrim {args.command}: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
