"""The ``vitrim`` command line: parses, calls the API, prints."""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vitrim.errors import ConfigError, DataError, VitrimError


class Parser(argparse.ArgumentParser):
    """argparse with errors on one line (the usage is one ``--help`` away)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float within [low, high] (open ends where asked)."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    span = f"{left}{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}{right}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"expected a number in {span}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


positive_float = number(0, low_open=True)
non_negative_float = number(0)
unit_float = number(0, 1)


def augment_spec(text: str) -> str:
    from vitrim.train.config import normalize_augment

    try:
        return normalize_augment(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def seed_int(text: str) -> int:
    from vitrim.train.config import MAX_SEED

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed in 0..{MAX_SEED}, got {value}")
    return value


def thread_count(text: str) -> int:
    value = positive_int(text)
    limit = max(64, 4 * (os.cpu_count() or 1))
    if value > limit:
        raise argparse.ArgumentTypeError(f"{value} threads for {os.cpu_count()} cores; use at most {limit}")
    return value


def resolve_model(spec: str, allow_random: bool = False, pretrained: bool = False,
                  native: bool = False) -> tuple[Any, str]:
    """``(model, weights)`` for a model spec (see :mod:`vitrim.adapters.sources`).

    ``weights`` is "trained", "pretrained" or "random"; random weights (a preset without bundled
    weights, ``timm:NAME`` without ``pretrained``) only if ``allow_random``. Hugging Face and timm
    models come back as their exact canonical equivalent, or with ``native`` run by their own
    forward (for latency and accuracy).
    """
    from vitrim.adapters import family_of, to_canonical
    from vitrim.adapters.native import NativeModel
    from vitrim.adapters.sources import load_model

    loaded = load_model(spec, pretrained=pretrained, allow_random=allow_random)
    if loaded.weights == "random" and not allow_random:
        raise ConfigError(f"{spec} has random weights here; add --pretrained for timm's trained weights "
                          f"(needs the network or timm's local cache)")
    model = loaded.model
    if family_of(model) in ("hf", "timm"):
        model = NativeModel(model) if native else to_canonical(model)
    return model, loaded.weights


def add_pretrained(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pretrained", action="store_true",
                   help="timm:NAME only: timm's pretrained weights (needs the network or timm's local cache; "
                        "default: random weights)")


def resolve_torch_or_onnx(args: argparse.Namespace, allow_random: bool = False) -> tuple[Any, str]:
    """A ``.onnx`` file through ONNX Runtime, else :func:`resolve_model` run natively with ``--pretrained``."""
    from vitrim.quant.cli import is_onnx_spec, resolve_model_or_onnx

    if is_onnx_spec(args.model):
        model, weights = resolve_model_or_onnx(args, allow_random=allow_random)
    else:
        model, weights = resolve_model(args.model, allow_random=allow_random, pretrained=args.pretrained, native=True)
    check_batch_options(model, args)
    return model, weights


BATCH_OPTIONS = {"batch": "--batch", "batch_size": "--batch-size", "latency_batch": "--latency-batch",
                 "check_images": "--check-images"}


def check_batch_options(model: Any, args: argparse.Namespace) -> None:
    """Refuse, before any work, batch options whose activations would not fit in this machine's RAM."""
    from vitrim.limits import check_batch_memory

    config = getattr(model, "config", None)
    if config is None:
        return
    for attr, flag in BATCH_OPTIONS.items():
        value = getattr(args, attr, None)
        for batch in value if isinstance(value, list) else [value]:
            if isinstance(batch, int):
                check_batch_memory(config, batch, f"{flag} {batch}")


def load_data_for(model, args: argparse.Namespace, split: str):
    from vitrim.data import load_dataset

    cfg = model.config
    data = load_dataset(args.data, split, data_dir=args.data_dir, image_size=cfg.image_size,
                        channels=cfg.in_chans)
    if data.channels != cfg.in_chans:
        raise DataError(f"{args.data} has {data.channels}-channel images but the model expects "
                        f"{cfg.in_chans}; use a model built for {data.channels} channel(s)")
    if data.image_size != cfg.image_size and not args.resize:
        raise DataError(f"{args.data} has {data.image_size}x{data.image_size} images but the model "
                        f"expects {cfg.image_size}x{cfg.image_size}; pass --resize to resize them")
    if args.limit is not None:
        data = data.subset(min(args.limit, len(data)))
    from vitrim.bench.accuracy import check_fits

    check_fits(model, data, getattr(args, "model", None) or "the model")
    return data


FAMILY_DATA_HINT = ("For a Hugging Face or timm model, pass --data folder:DIR (class sub-folders of images, "
                    "resized to the model's input)")


def data_for_family(model: Any, args: argparse.Namespace, split: str, family: str) -> Any:
    """:func:`load_data_for`, its error telling Hugging Face / timm users which data fits."""
    try:
        return load_data_for(model, args, split)
    except DataError as exc:
        if family not in ("hf", "timm"):
            raise
        hint = FAMILY_DATA_HINT + (", or --data random (random images labelled by the model itself, for speed "
                                   "checks)" if args.command == "prune" else "")
        raise DataError(f"{exc}. {hint}") from None


def add_data_args(p: argparse.ArgumentParser, limit_help: str, random: bool = False) -> None:
    kinds = "fashion-mnist | idx:DIR (MNIST-format IDX files) | folder:DIR (class sub-folders)"
    p.add_argument("--data", default="fashion-mnist",
                   help=kinds + (" | random (random images labelled by the dense model: calibration for speed "
                                 "checks, no accuracy)" if random else ""))
    p.add_argument("--data-dir", default=None, help="directory holding the Fashion-MNIST IDX files")
    p.add_argument("--resize", action="store_true", help="resize images to the model's input size")
    p.add_argument("--limit", type=positive_int, default=None, help=limit_help)


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=thread_count, default=None,
                   help="torch intra-op threads (default: the cores other processes leave free, "
                        "sampled before timing)")


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def cmd_models(args: argparse.Namespace) -> None:
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
    from vitrim.adapters import head_kind
    from vitrim.adapters.native import NativeModel
    from vitrim.bench import evaluate

    model, _ = resolve_torch_or_onnx(args)
    family = model.family if isinstance(model, NativeModel) else "vitrim"
    if isinstance(model, NativeModel) and head_kind(model.model) != "classifier":
        raise ConfigError(f"{args.model} is a {type(model.model).__name__} without a classifier; eval needs "
                          f"class logits (bench, analyze and prune take backbones)")
    data = data_for_family(model, args, args.split, family)
    with _threads(args.threads):
        metrics = evaluate(model, data, batch_size=args.batch_size, image_size=model.config.image_size,
                           progress=not args.json)
    result = {"model": args.model, "data": args.data, "split": args.split, **metrics}
    emit(args, result, f"{args.model} on {args.data}/{args.split}: top-1 accuracy "
                       f"{metrics['accuracy'] * 100:.2f}%  loss {metrics['loss']:.4f}  ({metrics['count']} images)")


def _threads(threads: int | None):
    from vitrim.bench.latency import fixed_threads

    return fixed_threads(threads)


def bench_text(name: str, result: dict[str, Any]) -> str:
    from vitrim.report import format_table, human

    rows = []
    for batch, entry in result["latency"].items():
        mem = entry.get("peak_activation_bytes")
        rows.append([batch, f"{entry['median_ms']:.2f}", f"{entry['p10_ms']:.2f}-{entry['p90_ms']:.2f}",
                     f"{entry['images_per_s']:.0f}", human(mem, "B") if mem is not None else "n/a"])
    flops = f"{human(result['flops'])}FLOPs" if result["flops"] is not None else "unknown FLOPs"
    head = (f"{name}: {human(result['params'])} params, {flops} per image, "
            f"threads={result['threads'] or torch.get_num_threads()}")
    return head + "\n" + format_table(rows, ["batch", "median ms", "p10-p90 ms", "images/s", "peak act. mem"])


def cmd_bench(args: argparse.Namespace) -> None:
    from vitrim.bench.latency import choose_threads, unstable_warning
    from vitrim.quant.cli import measure_all
    from vitrim.report import format_table

    specs = args.model if isinstance(args.model, list) else [args.model]
    if len(set(specs)) != len(specs):
        raise ConfigError(f"a model is named twice in {' '.join(specs)}; name each model once")
    choice = choose_threads(args.threads)  # one count for every model, ORT sessions included
    models, weights = {}, {}
    for spec in specs:
        models[spec], weights[spec] = resolve_torch_or_onnx(argparse.Namespace(**{**vars(args), "model": spec,
                                                                                "threads": choice.threads}),
                                                            allow_random=True)
    batches = args.batch or [1, 64]
    results = measure_all(models, batches, threads=choice, runs=args.runs)  # interleaved
    for spec in specs:
        results[spec].update(model=spec, weights=weights[spec])
    text = "\n\n".join(bench_text(spec, results[spec]) for spec in specs)
    if len(specs) > 1:
        rows = [[spec] + [f"{results[spec]['latency'][str(b)]['speedup']:.2f}x" for b in batches] for spec in specs]
        text += f"\n\nspeed-up against {specs[0]} (timed interleaved)\n" + \
            format_table(rows, ["model"] + [f"b={b}" for b in batches])
    text += unstable_warning((spec, b, e) for spec in specs for b, e in results[spec]["latency"].items())
    data = results[specs[0]] if len(specs) == 1 else {"models": specs, "reference": specs[0], "threads": choice.threads,
                                                      "thread_policy": choice.to_dict(), "results": results}
    emit(args, data, text)


def cmd_analyze(args: argparse.Namespace) -> None:
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
    import vitrim
    from vitrim.train import TrainConfig, fit

    from vitrim.fsutil import check_output_dir, output_lock
    from vitrim.train.loop import CHECKPOINT_DIR, check_teacher

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
    check_teacher(model, teacher)
    args.limit = None  # --limit applies to the training split only
    train_set = load_data_for(model, args, "train")
    test_set = None if args.no_eval else load_data_for(model, args, "test")
    command = "vitrim " + " ".join(shlex.quote(a) for a in args.argv)
    with output_lock(out), _threads(args.threads):
        result = fit(model, train_set, cfg, out, test_set=test_set, teacher=teacher, resume=args.resume,
                     image_size=model.config.image_size, locked=True)
        vitrim.save(result.model, out, extra={"training": {"command": command, "config": cfg.to_dict(),
                                                           "history": result.history}},
                    carry=[CHECKPOINT_DIR], locked=True)
    final = result.history[-1]
    print(f"saved {out}  (epoch {final['epoch']}, train loss {final['train_loss']:.4f}"
          + (f", test accuracy {final['test_accuracy'] * 100:.2f}%" if "test_accuracy" in final else "") + ")")


def training_model(args: argparse.Namespace):
    """The model ``vitrim train`` starts from: a fresh preset, or ``--init``'s weights; for
    ``--arch iret``, the incremental-resolution ViT built from that ViT."""
    import vitrim

    if args.init:
        model = resolve_model(args.init)[0]
    else:
        model = vitrim.create(args.model)
        if args.drop_path is not None:
            model = vitrim.create(model.config.replace(drop_path_rate=args.drop_path), seed=args.seed)
    if args.arch == "vit":
        return model
    if args.arch == "tokens":
        from vitrim.tokens import TokenReducedViT

        if not args.init:
            raise ConfigError("--arch tokens fine-tunes a trained model for token reduction; pass --init MODEL")
        return TokenReducedViT(model, args.token_method, layers=args.layers,
                               train_keep=tuple(args.train_keep or (0.5, 1.0)), sandwich=args.sandwich)
    from vitrim.iret import IretOptions, incremental_from_vit

    options = IretOptions(detail_layer=args.detail_layer, kernel=args.lifting_kernel,
                          learnable=args.lifting == "learned", train_keep=tuple(args.train_keep or (0.1, 1.0)),
                          detail_mixer=args.detail_mixer, sandwich=args.sandwich)
    return incremental_from_vit(model, options)


def keep_range(text: str) -> list[float]:
    values = parse_floats(text)
    if len(values) != 2 or not 0 < values[0] <= values[1] <= 1:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH with 0 < LOW <= HIGH <= 1, got {text!r}")
    return values


def cmd_prune(args: argparse.Namespace) -> None:
    from vitrim.adapters.sources import load_model
    from vitrim.fsutil import check_output_dir, output_lock
    from vitrim.prune import PruneConfig

    cfg = PruneConfig(target=args.target, structures=args.structures, exclude=tuple(args.exclude or ()),
                      saliency=args.saliency, calib_images=args.calib, steps=args.steps, round_to=args.round_to,
                      recover=args.recover, kd_epochs=args.epochs, kd_images=args.kd_images, kd_lr=args.kd_lr,
                      step_kd_images=args.step_kd_images, latency_batch=args.latency_batch, seed=args.seed)
    name = args.model or "fmnist-vit"
    loaded = load_model(name, pretrained=args.pretrained, allow_random=True)
    out = check_output_dir(args.out or f"runs/{loaded.spec.stem}-{cfg.metric}{cfg.ratio:g}", "--out directory")
    with output_lock(out):  # a second run to the same --out is refused now, not after its work
        _prune_into(args, cfg, name, loaded, out)


def _prune_into(args: argparse.Namespace, cfg: Any, name: str, loaded: Any, out: Path) -> None:
    import vitrim
    from vitrim.adapters import family_of, to_canonical
    from vitrim.adapters.native import native
    from vitrim.bench import evaluate
    from vitrim.prune import prune
    from vitrim.prune.report import dimension_plan, plan_table, summary_table, write_report

    original = loaded.model  # pruned in its own family, saved as that family's class
    family = family_of(original) or "vitrim"
    model = to_canonical(original)
    check_batch_options(model, args)
    train_set, test_set = prune_data(model, args, family)
    progress = not args.json
    with _threads(args.threads):
        result = prune(original, config=cfg, data=train_set, train_data=train_set, progress=progress,
                       log=(lambda text: print(text, file=sys.stderr)) if progress else None)
        pruned_family = result.model
        result.model = to_canonical(pruned_family)
        report: dict[str, Any] = {"model": name, "family": family, "weights": loaded.weights,
                                  "calibration": train_set.name, "metric": result.metric,
                                  "kept_ratio": result.kept_ratio, "config": cfg.to_dict(), "steps": result.steps}
        from vitrim.bench import measure_many

        pairs = (("dense", model, original), ("pruned", result.model, pruned_family))
        runners = {key: native(runnable) for key, _, runnable in pairs}  # the family's own forward
        timed = measure_many(runners, [1, 64], threads=args.threads, runs=args.runs, memory=False)  # interleaved
        for key, net, _ in pairs:
            runner, entry = runners[key], timed[key]
            if test_set is not None:
                entry["accuracy"] = evaluate(runner, test_set, image_size=net.config.image_size,
                                             progress=progress, desc=f"eval {key}")["accuracy"]
            entry["dimension_plan"] = dimension_plan(net.config)
            entry["embed_dim"] = net.config.embed_dim
            report[key] = entry
    command = "vitrim " + " ".join(shlex.quote(a) for a in args.argv)
    report["command"] = command
    vitrim.save(pruned_family, out, extra={"pruning": {"command": command, "base": name,
                                                       "config": cfg.to_dict(), "kept_ratio": result.kept_ratio}},
                add_files=lambda tmp: write_report(tmp / "report", report, model.config, result.model.config),
                locked=True)
    text = (f"{summary_table(report)}\n\n{plan_table(model.config, result.model.config)}\n\n"
            f"saved the pruned model to {out} and the report to {out / 'report'}")
    emit(args, report, text)


def prune_data(model: Any, args: argparse.Namespace, family: str) -> tuple[Any, Any]:
    """Calibration/training images and test images (None: no evaluation) for ``vitrim prune``."""
    if args.data == "random":
        from vitrim.adapters.random_data import pseudo_labelled

        # the labels are the dense model's own predictions: accuracy against them means nothing
        return pseudo_labelled(model, args.calib, seed=args.seed), None
    limit, args.limit = args.limit, None
    train_set = data_for_family(model, args, "train", family)
    args.limit = limit
    return train_set, None if args.no_eval else data_for_family(model, args, "test", family)


def parse_ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices, got {text!r}") from None


def parse_floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def cmd_tokens(args: argparse.Namespace) -> None:
    from vitrim.bench import evaluate
    from vitrim.bench.flops import model_cost
    from vitrim.bench.latency import WithSetting, example_input, interleaved_latency, unstable_warning
    from vitrim.report import format_table
    from vitrim.tokens import reduce_tokens, reduced_flops

    model, _ = resolve_model(args.model or "fmnist-vit", allow_random=args.no_eval, pretrained=args.pretrained)
    check_batch_options(model, args)
    knob = "tau" if args.mode == "dynamic" else "keep"
    values = args.sweep or [args.tau if knob == "tau" else args.keep]
    from vitrim.iret import IncrementalViT

    if isinstance(model, IncrementalViT):  # its own knob; compared against itself with every detail
        reduced, model = model, copy.deepcopy(model)
        reduced.mode, args.method = args.mode, "iret"
    else:
        reduced = reduce_tokens(model, args.method, layers=args.layers, mode=args.mode)
        args.method = reduced.method
    for value in values:  # validate every knob value before any work
        setattr(reduced, knob, value)
    test_set = None if args.no_eval else load_data_for(model, args, "test")
    dense_flops = model_cost(model.config).flops
    rows = []
    batches = args.batch or [1, 64]
    with _threads(args.threads):
        for value in values:
            setattr(reduced, knob, value)
            row: dict[str, Any] = {knob: value}
            if test_set is not None:
                row["accuracy"] = evaluate(reduced, test_set, image_size=model.config.image_size)["accuracy"]
            sample = next(test_set.batches(64, image_size=model.config.image_size))[0] if test_set is not None \
                else torch.randn(64, model.config.in_chans, model.config.image_size, model.config.image_size)
            row["flops_ratio"] = reduced_flops(reduced, sample) / dense_flops
            rows.append(row)
        runners = {"dense": model, **{f"{knob}={i}": WithSetting(reduced, **{knob: v}) for i, v in enumerate(values)}}
        timed = interleaved_latency(runners, batches, threads=args.threads, runs=args.runs,
                                    example=lambda b: example_input(model, b))  # dense and every value interleaved
    for i, row in enumerate(rows):
        stats = timed[f"{knob}={i}"]
        row.update({f"speedup_b{b}": stats[b]["speedup"] for b in batches})
        row["latency"] = {str(b): stats[b] for b in batches}
    dense_latency = {str(b): timed["dense"][b] for b in batches}
    table = [[f"{r[knob]:g}", f"{r['accuracy'] * 100:.2f}%" if "accuracy" in r else "-", f"{r['flops_ratio']:.3f}"]
             + [f"{r[f'speedup_b{b}']:.2f}x" + ("" if r["latency"][str(b)]["stable"] and dense_latency[str(b)]["stable"]
                                                 else "*") for b in batches] for r in rows]
    header = [knob, "accuracy", "FLOPs kept"] + [f"speedup b={b}" for b in batches]
    warning = unstable_warning((name, b, stats[b]) for name, stats in timed.items() for b in batches)
    emit(args, {"model": args.model or "fmnist-vit", "method": args.method, "mode": args.mode,
                "layers": list(reduced.layers), "dense_latency": dense_latency, "rows": rows},
         f"{args.method} ({args.mode}) at layers {list(reduced.layers)}\n" + format_table(table, header) + warning)


def cmd_compress(args: argparse.Namespace) -> None:
    from vitrim.compress import CompressConfig, compress, stage_table

    cfg = CompressConfig(prune=None if args.prune == "none" else args.prune, recover=args.recover,
                         prune_calib=args.prune_calib,
                         tokens=None if args.tokens == "none" else args.tokens, token_method=args.token_method,
                         token_layers=tuple(args.layers) if args.layers else None,
                         quant=None if args.quant == "none" else args.quant, calib=args.calib,
                         calib_method=args.calib_method, threads=args.threads, runs=args.runs)
    name = args.model or "fmnist-vit"
    model, _ = resolve_model(name, pretrained=args.pretrained)
    limit, args.limit = args.limit, None
    train_set = load_data_for(model, args, "train")
    args.limit = limit
    test_set = load_data_for(model, args, "test")
    from vitrim.adapters.sources import parse_spec

    out = Path(args.out or f"runs/{parse_spec(name).stem}-compressed")
    progress = not args.json
    with _threads(args.threads):
        report = compress(model, train_set, test_set, cfg, out, progress=progress,
                          log=(lambda text: print(text, file=sys.stderr)) if progress else (lambda text: None))
    report["command"] = "vitrim " + " ".join(shlex.quote(a) for a in args.argv)
    emit(args, report, f"{stage_table(report)}\n\nartefacts and report.{{json,md,png}} in {out}")


def build_parser() -> argparse.ArgumentParser:
    from vitrim import __version__
    from vitrim.prune.api import RECOVERY
    from vitrim.tokens.model import METHODS as TOKEN_METHODS
    from vitrim.quant.cli import add_onnx_input_args, register as register_quant

    parser = Parser(prog="vitrim", description="Make Vision Transformers smaller and faster.")
    parser.add_argument("--version", action="version", version=f"vitrim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from vitrim.adapters.sources import SPEC_HELP

    model_help = SPEC_HELP

    p = sub.add_parser("models", help="list the model presets")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("eval", help="top-1 accuracy and loss on a dataset")
    p.add_argument("model", help=model_help)
    add_data_args(p, "evaluate on the first N images only")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--batch-size", type=positive_int, default=256)
    add_threads(p)
    p.add_argument("--json", action="store_true", help="print a JSON object")
    add_onnx_input_args(p)
    add_pretrained(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="params, FLOPs, latency and memory")
    p.add_argument("model", nargs="+", help=model_help + "; presets without weights are measured at random init; "
                   "several models are timed interleaved, with speed-ups against the first")
    p.add_argument("--batch", type=positive_int, action="append", help="batch size (repeatable; default 1 and 64)")
    p.add_argument("--runs", type=positive_int, default=30, help="timed runs per batch size (median reported)")
    add_threads(p)
    p.add_argument("--json", action="store_true", help="print a JSON object")
    add_onnx_input_args(p)
    add_pretrained(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("analyze", help="per-block complexity: params, FLOPs and latency shares")
    p.add_argument("model", help=model_help)
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--runs", type=positive_int, default=20)
    add_threads(p)
    p.add_argument("--json", action="store_true", help="print a JSON object")
    add_pretrained(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("prune", help="prune a model to a FLOPs or params budget, then recover accuracy")
    p.add_argument("model", nargs="?", default=None, help=model_help + " (default: the bundled fmnist-vit)")
    p.add_argument("--target", default="flops=0.5",
                   help="fraction of the cost to keep: flops=0.5, params=0.6 or latency=0.5 (measured on this "
                        "machine; the table is cached)")
    p.add_argument("--latency-batch", type=positive_int, default=1, help="batch size for latency=... targets")
    p.add_argument("--recover", choices=list(RECOVERY), default="reconstruct",
                   help="reconstruct: least-squares refit, no training; kd: distillation from the dense model; "
                        "reconstruct+kd: the refit, then distillation")
    p.add_argument("--epochs", type=positive_int, default=1, help="distillation epochs for --recover kd")
    p.add_argument("--kd-images", type=positive_int, default=None, help="distil on the first N training images only")
    p.add_argument("--kd-lr", type=positive_float, default=2e-4)
    p.add_argument("--step-kd-images", type=int, default=0,
                   help="distil on this many training images between pruning steps (0: none)")
    p.add_argument("--structures", default="heads,qk,v,mlp,embed,attn-layer,mlp-layer",
                   help="comma-separated kinds that may be pruned")
    p.add_argument("--exclude", action="append", metavar="PATTERN",
                   help="never prune these modules (glob over names like blocks.0.attn, blocks.*.mlp, embed)")
    p.add_argument("--saliency", choices=["fisher", "taylor", "taylor2", "magnitude"], default="fisher",
                   help="fisher: 0.5 E[(dl/dg)^2]; taylor: |E[dl/dg]|; taylor2: both terms; magnitude: weight norm")
    p.add_argument("--calib", type=positive_int, default=512, help="calibration images (from the train split)")
    p.add_argument("--steps", type=positive_int, default=3, help="pruning steps, saliency re-estimated between")
    p.add_argument("--round-to", type=positive_int, default=8, help="kept dims are multiples of this")
    p.add_argument("--seed", type=seed_int, default=0)
    add_data_args(p, "evaluate on the first N test images only", random=True)
    p.add_argument("--no-eval", action="store_true", help="skip the accuracy evaluation")
    p.add_argument("--runs", type=positive_int, default=30, help="timed runs per latency measurement")
    p.add_argument("--out", default=None, help="output directory (default runs/MODEL-METRICRATIO)")
    add_threads(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_pretrained(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("tokens", help="run-time token reduction: accuracy, FLOPs and speed per knob value")
    p.add_argument("model", nargs="?", default=None, help=model_help + " (default: the bundled fmnist-vit)")
    p.add_argument("--method", choices=list(TOKEN_METHODS), default=None,
                   help="default: the method the model was fine-tuned for (vitrim train --arch tokens), else tome; "
                        "ignored for incremental-resolution models (vitrim train --arch iret), which sweep their own knob")
    p.add_argument("--mode", choices=["static", "dynamic"], default="static",
                   help="static: same count for the whole batch (--keep); dynamic: per-image counts (--tau)")
    p.add_argument("--keep", type=number(0, 1, low_open=True), default=0.7, help="fraction of patch tokens kept at each reduction layer")
    p.add_argument("--tau", type=number(), default=0.9,
                   help="dynamic mode, per image: drop/evit keep this share of the class attention; "
                        "tome merges token pairs whose key similarity exceeds it")
    p.add_argument("--sweep", type=parse_floats, default=None, help="comma-separated knob values to compare")
    p.add_argument("--layers", type=parse_ints, default=None,
                   help="blocks after which tokens are reduced, e.g. 2,4 (default: those the model was fine-tuned "
                        "with, else every depth/3 blocks)")
    add_data_args(p, "evaluate on the first N test images only")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--batch", type=positive_int, action="append", help="latency batch sizes (default 1 and 64)")
    p.add_argument("--runs", type=positive_int, default=30)
    add_threads(p)
    p.add_argument("--json", action="store_true")
    add_pretrained(p)
    p.set_defaults(func=cmd_tokens)

    from vitrim.quant.quantize import CALIBRATORS as COMPRESS_CALIBRATORS

    p = sub.add_parser("compress", help="prune, reduce tokens and quantize in one pipeline, with one report")
    p.add_argument("model", nargs="?", default=None, help=model_help + " (default: the bundled fmnist-vit)")
    p.add_argument("--prune", default="flops=0.5", help="pruning target, or none")
    p.add_argument("--recover", choices=list(RECOVERY), default="reconstruct")
    p.add_argument("--prune-calib", type=positive_int, default=512, help="calibration images for pruning")
    p.add_argument("--tokens", default="keep=0.7", help="static token reduction keep=RATIO, or none")
    p.add_argument("--token-method", choices=list(TOKEN_METHODS), default="tome",
                   help="tome merges similar tokens (default: keeps accuracy best without training); "
                        "drop/evit keep the tokens the class token attends to")
    p.add_argument("--layers", type=parse_ints, default=None,
                   help="blocks after which tokens are reduced")
    p.add_argument("--quant", default="w8a8", help="w8a8 | w8-dynamic | w4 | none")
    p.add_argument("--calib", type=positive_int, default=128, help="calibration images for quantization")
    p.add_argument("--calib-method", choices=list(COMPRESS_CALIBRATORS), default="minmax")
    add_data_args(p, "evaluate on the first N test images only")
    p.add_argument("--runs", type=positive_int, default=30)
    p.add_argument("--out", default=None, help="output directory (default runs/MODEL-compressed)")
    add_threads(p)
    p.add_argument("--json", action="store_true")
    add_pretrained(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("train", help="train a model (optionally distilling from a teacher)")
    p.add_argument("--model", default="fmnist-vit", help="preset to train (see `vitrim models`)")
    p.add_argument("--init", default=None, metavar="MODEL",
                   help="start from this trained model (directory or preset with weights) instead of a fresh preset")
    p.add_argument("--arch", choices=["vit", "iret", "tokens"], default="vit",
                   help="iret: the incremental-resolution ViT (coarse tokens, detail where attention looks), "
                        "built from --init or the preset; tokens: fine-tune --init's weights for token reduction "
                        "(--token-method, --layers), saved with that reduction as the model's default")
    p.add_argument("--detail-layer", type=int, default=1, help="iret: block after which details arrive (0-based)")
    p.add_argument("--lifting", choices=["learned", "haar"], default="learned",
                   help="iret: learn the 2-D lifting filters, or keep the fixed Haar transform")
    p.add_argument("--lifting-kernel", type=positive_int, default=3, help="iret: lifting filter length (odd)")
    p.add_argument("--detail-mixer", action="store_true",
                   help="iret: adapt each detail to its token with a small MLP (besides the linear detail embedding)")
    p.add_argument("--train-keep", type=keep_range, default=None, metavar="LOW,HIGH",
                   help="iret, tokens: each training batch keeps a random share of patches in this range "
                        "(default 0.1,1 for iret, 0.5,1 for tokens)")
    p.add_argument("--sandwich", action="store_true",
                   help="iret, tokens: run half of each training batch at the top of --train-keep")
    p.add_argument("--token-method", choices=list(TOKEN_METHODS), default="tome",
                   help="tokens: the reduction to fine-tune for")
    p.add_argument("--layers", type=parse_ints, default=None,
                   help="tokens: blocks after which tokens are reduced (default: every depth/3 blocks)")
    add_data_args(p, "train on the first N training images only (quick trials)")
    p.add_argument("--out", required=True, help="output model directory (checkpoints go to OUT/checkpoint)")
    p.add_argument("--epochs", type=positive_int, default=10)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--min-lr", type=non_negative_float, default=1e-5)
    p.add_argument("--weight-decay", type=non_negative_float, default=0.05)
    p.add_argument("--warmup-epochs", type=non_negative_float, default=None,
                   help="linear warm-up length (default: 1 epoch, or a tenth of a run shorter than 10 epochs)")
    p.add_argument("--label-smoothing", type=number(0, 1, high_open=True), default=0.1)
    p.add_argument("--drop-path", type=number(0, 1, high_open=True), default=None,
                   help="stochastic depth rate (default: the preset's)")
    p.add_argument("--augment", default="crop", type=augment_spec,
                   help="random transforms of training images: crop (shift by up to 2 pixels), flip (horizontal; "
                        "only for data whose mirror image has the same class), e.g. crop,flip, or none "
                        "(default: crop)")
    p.add_argument("--no-augment", action="store_true", help="same as --augment none")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto uses bf16 autocast where the CPU supports it")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--teacher", default=None, help="distil from this model (directory or preset with weights)")
    p.add_argument("--distill-alpha", type=unit_float, default=0.5)
    p.add_argument("--distill-temperature", type=positive_float, default=1.0)
    p.add_argument("--no-eval", action="store_true", help="skip the test-set evaluation after each epoch")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    add_threads(p)
    p.set_defaults(func=cmd_train)
    register_quant(sub)
    for command in sub.choices.values():
        command.add_argument("--verbose", action="store_true",
                             help="print the full trace of errors and the output of the tools vitrim calls")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    from vitrim.quant import deps

    deps.VERBOSE = args.verbose  # per run: the API keeps third-party output quiet
    try:
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


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


def fail(args: argparse.Namespace, message: str, code: int) -> int:
    if args.verbose:
        traceback.print_exc()
    print(f"vitrim {args.command}: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
