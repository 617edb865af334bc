"""What every ``vitrim`` sub-command shares: argument types, common options, reading model specs
and data from parsed arguments, printing. :mod:`vitrim.cli` and :mod:`vitrim.quant.cli` both build
on it (neither imports the other's helpers).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import math
import os
import shlex
from collections.abc import Callable
from typing import Any

from vitrim.errors import ConfigError, DataError

MAX_WORKERS = 256
DATA_KINDS = ("fashion-mnist | idx:DIR (MNIST-format IDX files) | folder:DIR (class sub-folders) | coco:DIR "
              "(COCO-format boxes and masks, for dense models: vitrim train --task)")


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that states each option's default (the library's, see :func:`default_of`), unless the
    help already says it or there is none to state (``None``, a flag)."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and _states_default(action):
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if _states_default(action) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _states_default(action: argparse.Action) -> bool:
    default = action.default
    return bool(action.option_strings) and not (default is None or isinstance(default, bool)
                                                or default == argparse.SUPPRESS)


class Parser(argparse.ArgumentParser):
    """argparse with errors on one line (the usage is one ``--help`` away), defaults in the help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def default_of(owner: Any, name: str) -> Any:
    """The default of field ``name`` of a dataclass, or of parameter ``name`` of a function.

    argparse options take their ``default=`` from here, so each default is declared once, in the
    library, and ``--help`` shows the one that applies.
    """
    if dataclasses.is_dataclass(owner):
        for f in dataclasses.fields(owner):
            if f.name == name:
                if f.default is not dataclasses.MISSING:
                    return f.default
                if f.default_factory is not dataclasses.MISSING:
                    return f.default_factory()
                break
        raise ConfigError(f"{owner.__name__} has no field {name!r} with a default")
    parameter = inspect.signature(owner).parameters.get(name)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        raise ConfigError(f"{owner.__name__}() has no parameter {name!r} with a default")
    return parameter.default


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
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


def worker_count(text: str) -> int:
    """An argparse type: decoding processes, 0 (this process) up to 256."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of processes, got {text!r}") from None
    if not 0 <= value <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"expected 0 (decode in this process) to {MAX_WORKERS}, got {value}")
    return value


positive_float = number(0, low_open=True)
non_negative_float = number(0)
unit_float = number(0, 1)


def augment_spec(text: str) -> str:
    """An argparse type: ``crop``, ``flip``, ``crop,flip`` or ``none``."""
    from vitrim.train.config import normalize_augment

    try:
        return normalize_augment(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def seed_int(text: str) -> int:
    """An argparse type: a seed in ``0..MAX_SEED``."""
    from vitrim.train.config import MAX_SEED

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed in 0..{MAX_SEED}, got {value}")
    return value


def thread_count(text: str) -> int:
    """An argparse type: a thread count this machine can run."""
    value = positive_int(text)
    limit = max(64, 4 * (os.cpu_count() or 1))
    if value > limit:
        raise argparse.ArgumentTypeError(f"{value} threads for {os.cpu_count()} cores; use at most {limit}")
    return value


def parse_ints(text: str) -> list[int]:
    """An argparse type: comma-separated block indices."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices, got {text!r}") from None


def parse_floats(text: str) -> list[float]:
    """An argparse type: comma-separated numbers."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def keep_range(text: str) -> list[float]:
    """An argparse type: ``LOW,HIGH`` with ``0 < LOW <= HIGH <= 1``."""
    values = parse_floats(text)
    if len(values) != 2 or not 0 < values[0] <= values[1] <= 1:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH with 0 < LOW <= HIGH <= 1, got {text!r}")
    return values


def add_pretrained(p: argparse.ArgumentParser) -> None:
    """``--pretrained``: timm's trained weights for ``timm:NAME``."""
    p.add_argument("--pretrained", action="store_true",
                   help="timm:NAME only: timm's pretrained weights (needs the network or timm's local cache; "
                        "default: random weights)")


def add_threads(p: argparse.ArgumentParser) -> None:
    """``--threads``."""
    p.add_argument("--threads", type=thread_count, default=None,
                   help="torch intra-op threads (default: the cores other processes leave free, "
                        "sampled before timing)")


def device_spec(text: str) -> str:
    """An argparse type: a device this machine has (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``),
    checked before any work; kept as typed."""
    from vitrim.device import resolve_device

    try:
        resolve_device(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_device(p: argparse.ArgumentParser, help_text: str = "") -> None:
    """``--device``, its default :func:`vitrim.device.resolve_device`'s."""
    from vitrim.device import DEVICE_HELP, resolve_device

    p.add_argument("--device", type=device_spec, default=default_of(resolve_device, "spec"),
                   help=f"where the model runs: {DEVICE_HELP}" + (f"; {help_text}" if help_text else ""))


def add_json(p: argparse.ArgumentParser, help_text: str = "print a JSON object") -> None:
    """``--json``."""
    p.add_argument("--json", action="store_true", help=help_text)


def add_data_args(p: argparse.ArgumentParser, limit_help: str, random: bool = False) -> None:
    """``--data``, ``--data-dir``, ``--resize`` and ``--limit``."""
    p.add_argument("--data", default="fashion-mnist",
                   help=DATA_KINDS + (" | random (random images labelled by the dense model: calibration for "
                                      "speed checks, no accuracy)" if random else ""))
    p.add_argument("--data-dir", default=None, help="directory holding the Fashion-MNIST IDX files")
    p.add_argument("--resize", action="store_true", help="resize images to the model's input size")
    p.add_argument("--limit", type=positive_int, default=None, help=limit_help)
    add_workers(p)


def add_workers(p: argparse.ArgumentParser) -> None:
    """``--workers``: decoding processes for image folders (which are then read lazily)."""
    p.add_argument("--workers", type=worker_count, default=None,
                   help="for --data folder:DIR: decode images lazily, batch by batch, in this many processes "
                        "(0: in this process); default: decode the folder into RAM when it fits in a quarter "
                        "of it (shared by torchrun's processes), else lazily with one process per core (at most 8)")


def add_onnx_input_args(p: argparse.ArgumentParser) -> None:
    """Preprocessing flags for ONNX files that carry no vitrim metadata (eval / bench)."""
    g = p.add_argument_group("ONNX files without vitrim metadata")
    g.add_argument("--image-size", type=positive_int, default=None, help="input height = width")
    g.add_argument("--in-chans", type=positive_int, default=None, help="input channels")
    g.add_argument("--mean", type=number(), nargs="+", default=None, help="per-channel mean")
    g.add_argument("--std", type=positive_float, nargs="+", default=None, help="per-channel std")


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    """Print ``data`` as JSON with ``--json``, else ``text``."""
    print(json.dumps(data, indent=2) if args.json else text)


def command_line(args: argparse.Namespace) -> str:
    """The command as typed, for reports."""
    return "vitrim " + " ".join(shlex.quote(a) for a in getattr(args, "argv", []))


def threads(count: int | None) -> Any:
    """A context fixing torch's thread count (``None``: leave it)."""
    from vitrim.bench.latency import fixed_threads

    return fixed_threads(count)


def resolve_model(spec: str, allow_random: bool = False, pretrained: bool = False,
                  native: bool = False) -> tuple[Any, str]:
    """``(model, weights)`` from :func:`vitrim.adapters.sources.load_model`: another family's model as
    its canonical equivalent, or with ``native`` run by its own forward; random weights only if
    ``allow_random``."""
    from vitrim.adapters.sources import load_model

    loaded = load_model(spec, pretrained=pretrained, allow_random=allow_random, require_trained=not allow_random,
                        form="native" if native else "canonical")
    return loaded.model, loaded.weights


def preprocessing_from_args(args: argparse.Namespace) -> Any:
    """A :class:`Preprocessing` from ``--image-size/--in-chans/--mean/--std``, or None if none given."""
    from vitrim.quant.metadata import Preprocessing

    flags = {"--image-size": getattr(args, "image_size", None), "--in-chans": getattr(args, "in_chans", None),
             "--mean": getattr(args, "mean", None), "--std": getattr(args, "std", None)}
    given = [k for k, v in flags.items() if v is not None]
    if not given:
        return None
    missing = [k for k, v in flags.items() if v is None]
    if missing:
        raise ConfigError(f"preprocessing flags go together; also pass {', '.join(missing)} (no defaults are guessed)")
    return Preprocessing(args.image_size, args.in_chans, tuple(args.mean), tuple(args.std))


def resolve_runnable(args: argparse.Namespace, allow_random: bool = False) -> tuple[Any, str]:
    """``args.model`` ready to run for eval/bench: a ``.onnx`` file in ONNX Runtime (``--threads``,
    the preprocessing flags), an integer-only directory, or a torch model by its family's own forward;
    batch options checked against this machine's RAM."""
    from vitrim.adapters.sources import load_model

    loaded = load_model(args.model, pretrained=getattr(args, "pretrained", False), allow_random=allow_random,
                        require_trained=not allow_random, form="native", onnx=True,
                        threads=getattr(args, "threads", None), preprocessing=preprocessing_from_args(args))
    check_batch_options(loaded.model, args)
    return loaded.model, loaded.weights


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


def load_data_for(model: Any, args: argparse.Namespace, split: str) -> Any:
    """``--data``'s ``split``, checked to fit ``model`` (size, channels, classes); ``--limit`` applied."""
    from vitrim.bench.accuracy import check_fits
    from vitrim.data import load_dataset

    cfg = model.config
    data = load_dataset(args.data, split, data_dir=args.data_dir, image_size=cfg.image_size,
                        channels=cfg.in_chans, workers=getattr(args, "workers", None))
    if data.channels != cfg.in_chans:
        raise DataError(f"{args.data} has {data.channels}-channel images but the model expects "
                        f"{cfg.in_chans}; use a model built for {data.channels} channel(s)")
    if data.image_size != cfg.image_size and not args.resize:
        raise DataError(f"{args.data} has {data.image_size}x{data.image_size} images but the model "
                        f"expects {cfg.image_size}x{cfg.image_size}; pass --resize to resize them")
    if getattr(args, "limit", None) is not None:
        data = data.subset(min(args.limit, len(data)))
    if data.labelled:  # unlabelled images (a flat folder) serve label-free pruning only
        check_fits(model, data, getattr(args, "model", None) or "the model")
    return data


def train_and_test(model: Any, args: argparse.Namespace, family: str = "vitrim",
                   test: bool = True) -> tuple[Any, Any]:
    """The training split (whole: ``--limit`` is for the test split) and the test split (or None)."""
    limit, args.limit = args.limit, None
    train_set = data_for_family(model, args, "train", family)
    args.limit = limit
    return train_set, data_for_family(model, args, "test", family) if test else None


FAMILY_DATA_HINT = ("For a Hugging Face or timm model, pass --data folder:DIR (class sub-folders of images, or a "
                    "flat folder of unlabelled images for label-free pruning; resized to the model's input)")


def data_for_family(model: Any, args: argparse.Namespace, split: str, family: str) -> Any:
    """:func:`load_data_for`, its error telling users of other families which data fits."""
    try:
        return load_data_for(model, args, split)
    except DataError as exc:
        if family == "vitrim":
            raise
        hint = FAMILY_DATA_HINT + (", or --data random (random images labelled by the model itself, for speed "
                                   "checks)" if args.command == "prune" else "")
        raise DataError(f"{exc}. {hint}") from None


def training_model(args: argparse.Namespace) -> Any:
    """The model ``vitrim train`` starts from: a fresh preset, or ``--init``'s weights; for
    ``--arch iret``, the incremental-resolution ViT built from that ViT."""
    import vitrim

    if args.init:
        model = resolve_model(args.init)[0]
    else:
        model = vitrim.create(args.model)
        if args.drop_path is not None:
            model = vitrim.create(model.config.replace(drop_path_rate=args.drop_path), seed=args.seed)
    if args.image_size is not None and args.image_size != model.config.image_size:
        from vitrim.models.resize import with_image_size

        model = with_image_size(model, args.image_size)
        args.resize = True  # the data follows the model's new input size
    if args.arch == "vit":
        return model
    if args.arch == "tokens":
        from vitrim.tokens import TokenReducedViT

        if not args.init:
            raise ConfigError("--arch tokens fine-tunes a trained model for token reduction; pass --init MODEL")
        return TokenReducedViT(model, args.token_method, layers=args.layers,
                               train_keep=tuple(args.train_keep or TOKENS_TRAIN_KEEP), sandwich=args.sandwich)
    from vitrim.iret import IretOptions, incremental_from_vit

    train_keep = tuple(args.train_keep or default_of(IretOptions, "train_keep"))
    if args.dense_top and not (args.sandwich and train_keep[1] == 1):
        raise ConfigError("--dense-top trains the top of the knob only on the sandwich's half batch at keep=1: "
                          "add --sandwich, with a --train-keep range that reaches 1")
    options = IretOptions(detail_layer=args.detail_layer, kernel=args.lifting_kernel,
                          learnable=args.lifting == "learned",
                          train_keep=train_keep, detail_mixer=args.detail_mixer, sandwich=args.sandwich,
                          dense_top=args.dense_top)
    return incremental_from_vit(model, options)



TOKENS_TRAIN_KEEP = (0.5, 1.0)  # `train --arch tokens`: the keep range each training batch draws from
