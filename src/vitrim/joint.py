"""One budget over dimensions, tokens and bits: choose the pruning ratio, the token keep ratio and
reduction layers, and the precision together.

Every candidate ``(prune ratio, keep, layers, precision)`` gets an estimated loss increase, the
sum of one term per lever:

- dimensions: the plan the global search picks at that FLOPs ratio from one Fisher saliency pass
  on the dense model; its loss increase measured on held-out training images after layer-wise
  reconstruction (``prune_loss="measured"``, the default), or the Fisher estimate itself, the sum
  over the structures it removes (``"fisher"``: no reconstruction needed, but it estimates the
  loss *before* recovery and, summed over many structures, underestimates it — on fmnist-vit
  0.0003 for half the FLOPs where the reconstructed plan measures 0.017 — so it favours pruning
  over the measured levers);
- tokens: the measured increase of the calibration loss of the dense model reduced at that keep
  ratio and those layers;
- precision: the measured increase of the calibration loss of the dense model quantized to that
  scheme, run in ONNX Runtime.

Its cost is the FLOPs ratio (``flops=``: dimensions x tokens; the precision is not part of that
budget) or the latency relative to dense torch fp32 eager on this machine (``latency=``):
every dimension plan x token setting timed in torch in one interleaved run; in ONNX Runtime, each
plan exported per scheme and timed against dense, its token settings scaled as in torch. The
cheapest-loss candidates predicted inside the budget are then built as they would run (the dense
model's weights sliced by the plan: the values shift the latency by a few percent, randomly
initialised weights ran up to 4% faster) and timed against dense, interleaved, until one meets the
budget: the choice's latency is measured, not predicted. When none does, the prediction's bias on
those timed corrects the others' predictions and a second round times the best of those then
predicted inside, or, if none is, the cheapest. A timing near the budget only selects a candidate
for confirmation; fresh timings decide, so one lucky timing cannot pass it.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitrim.data.dataset import ImageSet
from vitrim.errors import ConfigError
from vitrim.models import VisionTransformer, ViTConfig
from vitrim.progress import progress_bar

FP32 = "fp32"
PRUNE_LOSSES = ("fisher", "measured")
JOINT_METRICS = ("flops", "latency")
NEAR_BUDGET = 0.25  # a latency ratio measured under the budget, or this close over it, is timed again ...
CONFIRM_TIMINGS = 3  # ... this many times, and the median of those fresh timings counts
Layers = tuple[int, ...]


def parse_joint_target(target: str) -> tuple[str, float]:
    """``"latency=0.15"`` -> ("latency", 0.15): the fraction of dense torch fp32 eager to keep."""
    metric, sep, value = str(target).partition("=")
    metric = metric.strip()
    if not sep or metric not in JOINT_METRICS:
        raise ConfigError(f"joint target {target!r} must look like latency=0.15 or flops=0.3")
    try:
        ratio = float(value)
    except ValueError:
        raise ConfigError(f"joint target ratio {value!r} is not a number") from None
    if not (math.isfinite(ratio) and 0 < ratio <= 1):
        raise ConfigError(f"joint target ratio must be in (0, 1] (the fraction of dense to keep), got {value}")
    return metric, ratio


@dataclass
class JointConfig:
    """The grids the joint search chooses from, and how it measures.

    ``layer_sets``: token reduction layer choices, ``None`` being the default (every depth/3
    blocks) and ``"early"`` from the second block on, every depth/4 blocks. ``precisions``:
    ``fp32`` (torch eager) and ONNX Runtime schemes. ``calib``: images for saliency,
    reconstruction and quantization calibration; ``eval_images``: other training images the loss
    curves are measured on. ``batch``: the batch size the latency budget is measured at.
    ``verify``: how many of the best predicted candidates may be built and timed before giving up.
    ``min_seconds``: how long each timing of a built candidate against dense lasts at least (at
    batch 1 on a shared 2-core machine the ratio from 20 runs moves by about 10% between repeats,
    from 100 by about 3%).
    """

    target: str = "latency=0.25"
    prune_ratios: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
    keeps: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
    layer_sets: tuple[Any, ...] = (None, "early")
    precisions: tuple[str, ...] = (FP32, "w8a8", "w8-dynamic")
    token_method: str = "tome"
    prune_loss: str = "measured"
    calib: int = 256
    eval_images: int = 512
    batch: int = 1
    runs: int = 15
    verify: int = 4
    min_seconds: float = 2.0
    round_to: int = 8
    threads: int | None = None

    def __post_init__(self) -> None:
        from vitrim.quant.quantize import SCHEMES
        from vitrim.tokens.model import check_method

        self.metric, self.ratio = parse_joint_target(self.target)
        check_method(self.token_method)
        if self.prune_loss not in PRUNE_LOSSES:
            raise ConfigError(f"unknown prune_loss {self.prune_loss!r}; use one of {', '.join(PRUNE_LOSSES)}")
        for name, values in (("prune_ratios", self.prune_ratios), ("keeps", self.keeps)):
            if not values or not all(0 < v <= 1 for v in values):
                raise ConfigError(f"{name} must be ratios in (0, 1], got {values}")
        unknown = [p for p in self.precisions if p != FP32 and p not in SCHEMES]
        if unknown or not self.precisions:
            raise ConfigError(f"unknown precision(s) {unknown or '(none)'}; use {FP32} or {', '.join(SCHEMES)}")
        for name in ("calib", "eval_images", "batch", "runs", "verify", "round_to"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not (math.isfinite(self.min_seconds) and self.min_seconds >= 0):
            raise ConfigError(f"min_seconds must be a finite number of seconds >= 0, got {self.min_seconds}")


@dataclass
class Candidate:
    """One joint setting with its estimated loss increase (per lever) and cost ratio."""

    prune_ratio: float
    keep: float
    layers: Layers
    precision: str
    loss_prune: float
    loss_tokens: float
    loss_quant: float
    predicted: float  # cost ratio: FLOPs, or latency predicted from the grids
    measured: float | None = None  # latency ratio of this exact setting, timed against dense

    @property
    def loss(self) -> float:
        return self.loss_prune + self.loss_tokens + self.loss_quant

    def label(self) -> str:
        layers = ",".join(map(str, self.layers)) if self.keep < 1 else "-"
        return f"prune {self.prune_ratio:g} / keep {self.keep:g} @{layers} / {self.precision}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "layers": list(self.layers), "loss": self.loss}


@dataclass
class JointPlan:
    """The choice, the runner-ups (best estimated loss within the budget), and the curves."""

    metric: str
    ratio: float
    chosen: Candidate
    runner_ups: list[Candidate]
    curves: dict[str, Any] = field(default_factory=dict)
    met: bool = True
    dimension_plan: Any = None  # the chosen prune ratio's PrunePlan, the shape that was timed (None: dense)

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "ratio": self.ratio, "met": self.met, "chosen": self.chosen.to_dict(),
                "runner_ups": [c.to_dict() for c in self.runner_ups], "curves": self.curves}


def resolve_layers(choice: Any, depth: int) -> Layers:
    """A layer-set choice (``None``, ``"early"`` or explicit indices) as block indices."""
    from vitrim.tokens.model import default_layers

    if choice is None:
        return default_layers(depth)
    if choice == "early":
        step = max(1, depth // 4)
        return tuple(range(1, depth - 1, step)) or (0,)
    layers = tuple(sorted({int(i) for i in choice}))
    if not layers or not all(0 <= i < depth for i in layers):
        raise ConfigError(f"token layers {choice} must be block indices between 0 and {depth - 1}")
    return layers


# ---------------------------------------------------------------- the three loss curves

def mean_loss(model: Any, data: ImageSet) -> float:
    """Mean cross-entropy of ``model`` on ``data``, resized to the model's input."""
    from vitrim.bench.accuracy import evaluate

    return evaluate(model, data, image_size=model.config.image_size)["loss"]


def dimension_plans(model: VisionTransformer, calib: Sequence[tuple[torch.Tensor, torch.Tensor]],
                    ratios: Sequence[float], round_to: int,
                    progress: bool = False) -> dict[float, tuple[ViTConfig, Any, float]]:
    """``{ratio: (config, plan, Fisher loss estimate)}``: the global search at each FLOPs ratio,
    from one saliency pass on the dense model."""
    from vitrim.prune.cost import CostModel
    from vitrim.prune.saliency import saliency
    from vitrim.prune.search import STRUCTURES, Search

    scores = saliency(model, calib, "fisher", total=len(calib), progress=progress)
    cost = CostModel("flops")
    dense = cost.total(model.config)
    # q/k norm spans each head's channels: those are pruned with their head only
    structures = tuple(s for s in STRUCTURES if not (s == "qk" and model.config.qk_norm))
    plans = {}
    for ratio in sorted(set(ratios), reverse=True):
        search = Search(model.config, scores, cost, structures=structures, round_to=round_to)
        removed = search.run(dense * ratio) if ratio < 1 else []
        plans[ratio] = (search.config(), search.plan(), float(sum(c.saliency for c in removed)))
    return plans


def measured_prune_losses(model: VisionTransformer, plans: dict[float, tuple[ViTConfig, Any, float]],
                          calib: Sequence[tuple[torch.Tensor, torch.Tensor]],
                          held_out: ImageSet, base: float, progress: bool = False) -> dict[float, float]:
    """The held-out loss increase of each plan, sliced from the dense model and reconstructed."""
    from vitrim.prune.recover import reconstruct
    from vitrim.prune.surgery import slice_model

    images = torch.cat([x for x, _ in calib])
    losses = {}
    for ratio, (_, plan, _) in progress_bar(plans.items(), total=len(plans), desc="plans reconstructed",
                                            enabled=progress):
        if ratio >= 1:
            losses[ratio] = 0.0
            continue
        pruned = slice_model(model, plan).eval()
        reconstruct(model, pruned, list(plan.embed), images)
        losses[ratio] = mean_loss(pruned, held_out) - base
    return losses


def token_losses(model: VisionTransformer, method: str, keeps: Sequence[float], layer_sets: Sequence[Layers],
                 held_out: ImageSet, base: float, progress: bool = False) -> dict[tuple[float, Layers], float]:
    """``{(keep, layers): loss increase}`` of the dense model with that static token reduction."""
    from vitrim.tokens import reduce_tokens

    losses = {}
    reduced = {layers: reduce_tokens(model, method, layers=layers, keep=1.0) for layers in layer_sets}
    settings = [(keep, layers) for layers in layer_sets for keep in keeps]
    for keep, layers in progress_bar(settings, desc="token settings", enabled=progress):
        reduced[layers].keep = keep
        losses[(keep, layers)] = 0.0 if keep >= 1 else mean_loss(reduced[layers], held_out) - base
    return losses


def quantized(model: nn.Module, scheme: str, calib: ImageSet, work: Path, threads: int | None) -> Any:
    """``model`` exported and quantized to ``scheme``, opened in ONNX Runtime."""
    from vitrim.quant import OnnxModel, quantize

    path = work / f"{len(list(work.iterdir()))}-{scheme}.onnx"
    result = quantize(model, path, scheme, calib=calib if scheme == "w8a8" else None, threads=threads)
    return OnnxModel(result.path, threads=threads)


def quant_losses(model: VisionTransformer, precisions: Sequence[str], calib: ImageSet,
                 held_out: ImageSet, base: float, work: Path,
                 threads: int | None, progress: bool = False) -> dict[str, float]:
    """``{scheme: loss increase}`` of the dense model quantized to each scheme (ONNX Runtime)."""
    losses = {FP32: 0.0}
    for scheme in progress_bar([p for p in precisions if p != FP32], desc="schemes quantized", enabled=progress):
        losses[scheme] = mean_loss(quantized(model, scheme, calib, work, threads), held_out) - base
    return losses


# ---------------------------------------------------------------- cost of each setting

def sliced(model: VisionTransformer, plans: dict[float, Any], ratio: float) -> VisionTransformer:
    """A new model: ``model`` cut to the dimension plan at ``ratio`` (its own weights, no recovery);
    ``model`` itself at 1."""
    from vitrim.prune.surgery import slice_model

    return model if ratio >= 1 else slice_model(model, plans[ratio][1]).eval()


def shaped(net: VisionTransformer, keep: float, layers: Layers, method: str) -> nn.Module:
    """``net`` with that token reduction (a view sharing its weights); ``net`` itself at keep 1."""
    from vitrim.tokens import reduce_tokens

    return net if keep >= 1 else reduce_tokens(net, method, layers=layers, keep=keep)


def flops_ratios(plans: dict[float, Any], keeps: Sequence[float], layer_sets: Sequence[Layers], method: str,
                 model: VisionTransformer, image: torch.Tensor) -> dict[tuple[float, float, Layers], float]:
    from vitrim.bench.flops import model_cost
    from vitrim.tokens import reduced_flops

    dense = model_cost(model.config).flops
    out = {}
    for ratio, (cfg, _, _) in plans.items():
        pruned = sliced(model, plans, ratio)
        for layers in layer_sets:
            for keep in keeps:
                net = shaped(pruned, keep, layers, method)
                flops = model_cost(cfg).flops if keep >= 1 else reduced_flops(net, image)
                out[(ratio, keep, layers)] = flops / dense
    return out


def latency_ratios(plans: dict[float, Any], keeps: Sequence[float], layer_sets: Sequence[Layers],
                   precisions: Sequence[str], method: str, model: VisionTransformer, calib: ImageSet, work: Path,
                   cfg: JointConfig, progress: bool = False,
                   log: Callable[[str], None] = lambda text: None
                   ) -> tuple[dict[tuple[float, float, Layers, str], float], dict]:
    """Predicted latency ratio of every setting: the torch grid, and for each plan exported per
    scheme its ONNX Runtime model timed against dense, scaled by the grid's token factor."""
    from vitrim.bench.latency import interleaved_latency, paired_latency

    runners: dict[str, nn.Module] = {"dense": model}
    names: dict[tuple[float, float, Layers], str] = {}
    pruned = {ratio: sliced(model, plans, ratio) for ratio in plans}
    for ratio in plans:
        for layers in layer_sets:
            for keep in keeps:
                if (ratio, keep) == (1.0, 1.0):
                    names[(ratio, keep, layers)] = "dense"
                    continue
                name = f"{ratio:g}/{keep:g}" + (f"/{layers}" if keep < 1 else "")
                names[(ratio, keep, layers)] = name
                runners.setdefault(name, shaped(pruned[ratio], keep, layers, method))
    log(f"joint search: {len(runners) - 1} torch settings and dense, interleaved over {cfg.runs} rounds")
    torch_ms = interleaved_latency(runners, [cfg.batch], threads=cfg.threads, runs=cfg.runs)
    onnx_ratio: dict[tuple[float, str], float] = {}  # the plan at keep 1 in ONNX Runtime, over dense
    exported = [(ratio, scheme) for ratio in pruned for scheme in precisions if scheme != FP32]
    for ratio, scheme in progress_bar(exported, desc="plans quantized and timed", enabled=progress):
        # timed as the built candidates are: interleaved with dense alone
        pair = paired_latency(model, quantized(pruned[ratio], scheme, calib, work, cfg.threads), cfg.batch,
                              threads=cfg.threads, runs=cfg.runs)
        onnx_ratio[(ratio, scheme)] = pair["second_ms"] / pair["first_ms"]

    def torch_ratio(name: str) -> float:
        return torch_ms[name][cfg.batch]["median_ms"] / torch_ms["dense"][cfg.batch]["median_ms"]

    out = {}
    for (ratio, keep, layers), name in names.items():
        in_torch = torch_ratio(name)
        tokens = in_torch / torch_ratio(names[(ratio, 1.0, layers)])  # what the token setting saves
        for p in precisions:
            out[(ratio, keep, layers, p)] = in_torch if p == FP32 else onnx_ratio[(ratio, p)] * tokens
    grid = {"dense_ms": torch_ms["dense"][cfg.batch]["median_ms"], "onnx_ratio": onnx_ratio}
    return out, grid


def candidate_timer(candidate: Candidate, plans: dict[float, Any], method: str, model: VisionTransformer,
                    calib: ImageSet, work: Path, cfg: JointConfig) -> Callable[[], float]:
    """``candidate`` built as it runs; each call of the result times it interleaved against dense
    and returns the latency ratio."""
    from vitrim.bench.latency import paired_latency

    net = shaped(sliced(model, plans, candidate.prune_ratio), candidate.keep, candidate.layers, method)
    if candidate.precision != FP32:
        net = quantized(net, candidate.precision, calib, work, cfg.threads)

    def ratio() -> float:
        pair = paired_latency(model, net, cfg.batch, threads=cfg.threads, runs=max(cfg.runs, 20),
                              min_seconds=cfg.min_seconds)
        return pair["second_ms"] / pair["first_ms"]

    return ratio


# ---------------------------------------------------------------- the search

def rank(candidates: list[Candidate], ratio: float) -> list[Candidate]:
    """The candidates predicted within ``ratio``, lowest estimated loss first (ties: cheaper)."""
    inside = [c for c in candidates if c.predicted <= ratio]
    return sorted(inside, key=lambda c: (c.loss, c.predicted))


@dataclass
class Levers:
    """Everything the joint search measured once, from which any budget is chosen: the dimension
    plans, every candidate with its estimated loss and predicted cost, the curves."""

    model: VisionTransformer
    cfg: JointConfig
    plans: dict[float, tuple[ViTConfig, Any, float]]
    candidates: list[Candidate]
    curves: dict[str, Any]
    calib_set: ImageSet
    held_set: ImageSet | None = None  # the training images the loss curves were measured on


def measure_levers(model: VisionTransformer, train: ImageSet, cfg: JointConfig, *, progress: bool = True,
                   log: Callable[[str], None] = lambda text: None) -> Levers:
    """The three loss curves and the cost of every candidate on the grids of ``cfg``."""
    needed = cfg.calib + cfg.eval_images
    if len(train) < needed:
        raise ConfigError(f"the joint search needs {needed} training images (calib {cfg.calib} + eval_images "
                          f"{cfg.eval_images}) but the set has {len(train)}; lower --joint-calib / --joint-eval")
    model = model.eval()
    size = model.config.image_size
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    calib_set, held_set = train.take(order[:cfg.calib]), train.take(order[cfg.calib:needed])
    calib = list(calib_set.batches(64, image_size=size))
    layer_sets = list(dict.fromkeys(resolve_layers(c, model.config.depth) for c in cfg.layer_sets))
    ratios = sorted(set(cfg.prune_ratios) | {1.0}, reverse=True)
    keeps = sorted(set(cfg.keeps) | {1.0}, reverse=True)
    base = mean_loss(model, held_set)
    log(f"joint search: dense calibration loss {base:.4f}; scoring dimensions")
    plans = dimension_plans(model, calib, ratios, cfg.round_to, progress)
    prune_loss = {r: p[2] for r, p in plans.items()}
    if cfg.prune_loss == "measured":
        log("joint search: reconstructing each dimension plan to measure its loss")
        prune_loss = measured_prune_losses(model, plans, calib, held_set, base, progress)
    log("joint search: token loss curve")
    tokens = token_losses(model, cfg.token_method, keeps, layer_sets, held_set, base, progress)
    precisions = list(dict.fromkeys(cfg.precisions if cfg.metric == "latency" else (cfg.precisions[0],)))
    with tempfile.TemporaryDirectory(prefix="vitrim-joint-") as tmp:
        work = Path(tmp)
        log("joint search: quantization error per scheme")
        quant = quant_losses(model, precisions, calib_set, held_set, base, work, cfg.threads, progress)
        if cfg.metric == "flops":
            image = next(held_set.batches(1, image_size=size))[0]
            flops = flops_ratios(plans, keeps, layer_sets, cfg.token_method, model, image)
            costs = {(r, k, L, p): v for (r, k, L), v in flops.items() for p in precisions}
            grid: dict[str, Any] = {}
        else:
            log("joint search: timing every dimension plan x token setting, and each plan per scheme")
            costs, grid = latency_ratios(plans, keeps, layer_sets, precisions, cfg.token_method, model, calib_set,
                                         work, cfg, progress, log)
    candidates = [Candidate(r, k, L, p, prune_loss[r], tokens[(k, L)], quant[p], cost)
                  for (r, k, L, p), cost in costs.items() if not (k >= 1 and L != layer_sets[0])]
    curves = {"base_loss": base, "prune": {str(r): v for r, v in prune_loss.items()},
              "prune_fisher": {str(r): p[2] for r, p in plans.items()},
              "tokens": [{"keep": k, "layers": list(L), "loss": v} for (k, L), v in tokens.items()],
              "quant": quant, "prune_loss": cfg.prune_loss,
              "grid": {"dense_ms": grid.get("dense_ms"),
                       "onnx_ratio": [{"prune_ratio": r, "scheme": s, "ratio": f}
                                      for (r, s), f in grid.get("onnx_ratio", {}).items()]}}
    return Levers(model, cfg, plans, candidates, curves, calib_set, held_set)


def choose(levers: Levers, ratio: float | None = None, *,
           log: Callable[[str], None] = lambda text: None) -> JointPlan:
    """The lowest estimated loss within ``ratio`` (default: the config's target); under a latency
    budget the best candidates are built and timed against dense until one meets it, and when none
    is predicted within it the ``verify`` cheapest are timed and the most accurate that meets it
    wins. If none timed meets it, a second round (:func:`second_round`) times up to ``verify`` more."""
    cfg = levers.cfg
    ratio = cfg.ratio if ratio is None else ratio
    candidates = [dataclasses.replace(c, measured=None) for c in levers.candidates]
    ranked = rank(candidates, ratio)
    predicted_inside = bool(ranked)
    if not predicted_inside:
        ranked = sorted(candidates, key=lambda c: (c.predicted, c.loss))
        log(f"joint search: no setting on the grids is predicted within {cfg.metric}={ratio:g}; the cheapest is "
            f"{ranked[0].predicted:.3f}" + (f" — timing the {min(cfg.verify, len(ranked))} cheapest as built"
                                            if cfg.metric == "latency" else " — widen --prune-ratios / --keeps"))
    chosen, met = ranked[0], predicted_inside
    if cfg.metric == "latency":
        chosen, met = verified(ranked[:cfg.verify], ratio, levers, stop_at_first=predicted_inside, log=log)
        retry, by_loss = ([], False) if met else second_round(candidates, ratio, predicted_inside, log)
        if retry:
            chosen, met = verified(retry[:cfg.verify], ratio, levers, stop_at_first=by_loss, log=log)
            if not met:
                chosen = min((c for c in candidates if c.measured is not None), key=lambda c: c.measured)
            ranked = ranked + [c for c in retry[:cfg.verify] if all(c is not r for r in ranked)]
    runner_ups = [c for c in ranked if c is not chosen][:5]
    dimension_plan = levers.plans[chosen.prune_ratio][1] if chosen.prune_ratio < 1 else None
    return JointPlan(cfg.metric, ratio, chosen, runner_ups, levers.curves, met, dimension_plan)


def second_round(candidates: list[Candidate], ratio: float, first_by_loss: bool,
                 log: Callable[[str], None]) -> tuple[list[Candidate], bool]:
    """After the first round timed none within ``ratio``: what to time next, and whether the first
    of those measured within wins (they are ranked by loss) or the most accurate within does.
    The untimed settings predicted within after :func:`recalibrated`'s correction; if none and
    the first round went by loss, the cheapest untimed (the first round already took the cheapest
    otherwise)."""
    retry = recalibrated(candidates, ratio, log)
    if retry or not first_by_loss:
        return retry, True
    log("joint search: timing the cheapest settings not yet timed")
    return sorted((c for c in candidates if c.measured is None), key=lambda c: (c.predicted, c.loss)), False


def recalibrated(candidates: list[Candidate], ratio: float,
                 log: Callable[[str], None] = lambda text: None) -> list[Candidate]:
    """After no timed candidate met ``ratio``: the prediction's bias on those timed (median of
    measured / predicted) applied to the untimed ones, and those then predicted within ``ratio``,
    lowest loss first. Empty when the predictions were not optimistic (nothing new to try)."""
    timed = [c for c in candidates if c.measured is not None]
    if not timed:
        return []
    bias = statistics.median(c.measured / c.predicted for c in timed)
    if bias <= 1:
        return []
    retry = rank([c for c in candidates if c.measured is None and c.predicted * bias <= ratio], math.inf)
    log(f"joint search: the {len(timed)} timed measured {bias:.2f}x their prediction; "
        + (f"{len(retry)} untimed setting(s) are predicted within the budget after that correction"
           if retry else "no untimed setting is predicted within the budget after that correction"))
    return retry


def verified(candidates: list[Candidate], ratio: float, levers: Levers, *, stop_at_first: bool,
             log: Callable[[str], None]) -> tuple[Candidate, bool]:
    """``(choice, met)`` among ``candidates`` built and timed against dense in turn: with
    ``stop_at_first`` (candidates ranked by loss) the first measured within ``ratio``; else (the
    cheapest, which the prediction put over the budget or which follow candidates that all timed
    over it) the lowest loss among those measured within it. Nothing within: the fastest measured.
    A first timing under ``ratio``, or less than :data:`NEAR_BUDGET` over it, only selects the
    candidate: :data:`CONFIRM_TIMINGS` fresh timings follow and their median counts, so one noisy
    timing neither admits a candidate nor rules out one that fits, and the timing that selected a
    candidate (likely low, or it would not have been selected) does not judge it."""
    with tempfile.TemporaryDirectory(prefix="vitrim-joint-") as tmp:
        for cand in candidates:
            timer = measure_candidate(cand, levers, Path(tmp))
            cand.measured = timer()
            log(f"joint search: {cand.label()}: predicted {cand.predicted:.3f}, measured {cand.measured:.3f}")
            if cand.measured <= ratio * (1 + NEAR_BUDGET):
                timings = [timer() for _ in range(CONFIRM_TIMINGS)]
                cand.measured = statistics.median(timings)
                log(f"joint search: {cand.label()}: under the budget or within {NEAR_BUDGET:.0%} over it, timed "
                    f"{len(timings)} more times ({', '.join(f'{t:.3f}' for t in timings)}): median "
                    f"{cand.measured:.3f}")
            if stop_at_first and cand.measured <= ratio:
                return cand, True
    timed = [c for c in candidates if c.measured is not None]
    inside = [c for c in timed if c.measured <= ratio]
    if inside:
        return min(inside, key=lambda c: (c.loss, c.measured)), True
    return min(timed, key=lambda c: c.measured), False


def measure_candidate(candidate: Candidate, levers: Levers, work: Path) -> Callable[[], float]:
    """:func:`candidate_timer` of ``candidate`` with the levers' plans, model and calibration images."""
    cfg = levers.cfg
    return candidate_timer(candidate, levers.plans, cfg.token_method, levers.model, levers.calib_set, work, cfg)


def plan_joint(model: VisionTransformer, train: ImageSet, cfg: JointConfig, *, progress: bool = True,
               log: Callable[[str], None] = lambda text: None) -> JointPlan:
    """Choose pruning ratio, token setting and precision together for ``cfg.target``."""
    return choose(measure_levers(model, train, cfg, progress=progress, log=log), log=log)


def plan_table(plan: JointPlan) -> str:
    """The choice and its runner-ups, one row each."""
    from vitrim.report import format_table

    rows = []
    for mark, c in [("chosen", plan.chosen)] + [("", c) for c in plan.runner_ups]:
        layers = ",".join(map(str, c.layers)) if c.keep < 1 else "-"
        rows.append([mark, f"{c.prune_ratio:g}", f"{c.keep:g}", layers, c.precision,
                     f"{c.loss_prune:.4f}", f"{c.loss_tokens:.4f}", f"{c.loss_quant:.4f}", f"{c.loss:.4f}",
                     f"{c.predicted:.3f}", "-" if c.measured is None else f"{c.measured:.3f}"])
    head = ["", "prune", "keep", "layers", "precision", "dL dims", "dL tokens", "dL bits", "dL total",
            f"{plan.metric} pred", "measured"]
    c = plan.chosen
    closest = (f"the fastest measured ({c.measured:.3f}); try a budget near that, or widen"
               if c.measured is not None else f"the cheapest on the grids ({c.predicted:.3f}); widen")
    verdict = "" if plan.met else (f"\nno setting met {plan.metric}={plan.ratio:g}: the chosen one is {closest} "
                                   "--prune-ratios / --keeps")
    return format_table(rows, head) + verdict


__all__ = ["Candidate", "JointConfig", "JointPlan", "Levers", "choose", "measure_levers", "parse_joint_target",
           "plan_joint", "plan_table", "rank", "resolve_layers"]
