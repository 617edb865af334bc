"""``vitrim.prune``: score, search and slice in steps, then recover."""

from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vitrim.data.dataset import ImageSet
from vitrim.errors import ConfigError, DataError
from vitrim.models import VisionTransformer
from vitrim.progress import progress_bar
from vitrim.prune.cost import CostModel
from vitrim.prune.recover import distill, reconstruct
from vitrim.prune.saliency import (METHODS, SECOND_ORDER, BatchLoss, FeatureDistance, Forward, LossFn,
                                   classification_loss, output_features, saliency)
from vitrim.prune.plan import PrunePlan
from vitrim.prune.search import STRUCTURES, Search
from vitrim.prune.surgery import slice_model
from vitrim.train.config import normalize_augment

RECOVERY = ("none", "reconstruct", "kd", "reconstruct+kd")  # the last: least squares, then distillation
TARGET_METRICS = ("flops", "params", "latency")
STRUCTURE_ALIASES = {"attn-layer": "attn_layer", "mlp-layer": "mlp_layer", "head": "heads"}
# what the loss measures: the classification loss on labels, the distance to the dense model's
# output features (no labels; for backbones), or "auto": features for a model without a
# classifier or data without labels, else labels
OBJECTIVES = ("auto", "labels", "features")


def parse_target(target: str | tuple[str, float]) -> tuple[str, float]:
    """``"flops=0.5"`` -> ("flops", 0.5): keep that fraction of the dense model's cost."""
    if isinstance(target, tuple):
        metric, ratio = target
    else:
        metric, sep, value = str(target).partition("=")
        if not sep:
            raise ConfigError(f"target {target!r} must look like flops=0.5, params=0.6 or latency=0.5")
        try:
            ratio = float(value)
        except ValueError:
            raise ConfigError(f"target ratio {value!r} is not a number") from None
    metric = metric.strip()
    if metric not in TARGET_METRICS:
        raise ConfigError(f"unknown target metric {metric!r}; use one of {', '.join(TARGET_METRICS)}")
    if not (math.isfinite(ratio) and 0 < ratio <= 1):
        raise ConfigError(f"target ratio must be in (0, 1] (the fraction of the cost to keep), got {ratio}")
    return metric, ratio


def parse_structures(structures: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """``"heads,mlp,attn-layer"`` -> ("heads", "mlp", "attn_layer"); ``None``: every kind."""
    if structures is None:
        return STRUCTURES
    items = structures.split(",") if isinstance(structures, str) else list(structures)
    names = tuple(STRUCTURE_ALIASES.get(s.strip(), s.strip()) for s in items if s.strip())
    unknown = [s for s in names if s not in STRUCTURES]
    if unknown or not names:
        raise ConfigError(f"unknown structure kind(s) {', '.join(unknown) or '(none given)'}; choose from "
                          f"heads, qk, v, mlp, embed, attn-layer, mlp-layer")
    return names


@dataclass
class PruneConfig:
    """Pruning settings; ``structures=None`` is every kind, but without ``embed`` under the
    ``features`` objective (a backbone keeps its output width unless ``embed`` is listed)."""

    target: str = "flops=0.5"
    structures: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    saliency: str = "fisher"
    calib_images: int = 512
    batch_size: int = 64
    steps: int = 3
    round_to: int | str = 8  # "auto": the multiple this device's kernels like, measured (prune.roundto)
    tolerance: float = 0.01
    recover: str = "reconstruct"
    kd_epochs: int = 1
    kd_images: int | None = None
    kd_lr: float = 2e-4
    kd_batch_size: int = 128
    kd_alpha: float | None = None  # the teacher's weight; None: DEFAULT_KD_ALPHA with fitting labels, else 1
    kd_augment: str | None = None  # the distillation images' augmentation; None: "none"
    latency_batch: int = 1  # batch size the latency table is measured at (target latency=...)
    latency_corrections: int = 2  # latency=...: further steps while the built model times over the target
    step_kd_images: int = 0  # distillation between pruning steps (0 = none)
    seed: int = 0
    objective: str = "auto"  # see OBJECTIVES

    def __post_init__(self) -> None:
        self.metric, self.ratio = parse_target(self.target)
        self._default_structures = self.structures is None  # not a field: replace() makes them explicit
        self.structures = parse_structures(self.structures)
        self.exclude = tuple(self.exclude)
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.objective!r}; use one of {', '.join(OBJECTIVES)}")
        if self.saliency not in METHODS:
            raise ConfigError(f"unknown saliency {self.saliency!r}; use one of {', '.join(METHODS)}")
        if self.recover not in RECOVERY:
            raise ConfigError(f"unknown recovery {self.recover!r}; use one of {', '.join(RECOVERY)}")
        if self.round_to != "auto" and (isinstance(self.round_to, str) or int(self.round_to) < 1):
            raise ConfigError(f"round_to must be a positive integer or 'auto', got {self.round_to!r}")
        for name in ("calib_images", "batch_size", "steps", "kd_epochs", "kd_batch_size",
                     "latency_batch"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.latency_corrections < 0:
            raise ConfigError(f"latency_corrections (--latency-corrections) must be >= 0, "
                              f"got {self.latency_corrections}")
        if self.step_kd_images < 0:
            raise ConfigError(f"step_kd_images must be >= 0, got {self.step_kd_images}")
        if not 0 <= self.tolerance < 0.5:
            raise ConfigError(f"tolerance must be in [0, 0.5), got {self.tolerance}")
        if not (math.isfinite(self.kd_lr) and self.kd_lr > 0):
            raise ConfigError(f"kd_lr (--kd-lr) must be a positive finite number, got {self.kd_lr}")
        if self.kd_images is not None and self.kd_images < 1:
            raise ConfigError(f"kd_images must be a positive integer, got {self.kd_images}")
        if self.kd_alpha is not None and not (math.isfinite(self.kd_alpha) and 0 <= self.kd_alpha <= 1):
            raise ConfigError(f"kd_alpha (--kd-alpha) is the teacher's weight, between 0 and 1, got {self.kd_alpha}")
        if self.kd_augment is not None:
            try:
                self.kd_augment = normalize_augment(self.kd_augment)
            except ConfigError as exc:
                raise ConfigError(f"kd_augment (--kd-augment): {exc}") from None

    @property
    def reconstructs(self) -> bool:
        return self.recover in ("reconstruct", "reconstruct+kd")

    @property
    def distils(self) -> bool:
        return self.recover in ("kd", "reconstruct+kd")

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items() if not k.startswith("_")}


@dataclass
class PruneResult:
    model: VisionTransformer
    dense_cost: float
    pruned_cost: float
    metric: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    embed_index: list[int] = field(default_factory=list)  # the dense channel of each kept embedding channel
    config: PruneConfig | None = None  # the settings used: objective decided, structures as pruned

    @property
    def kept_ratio(self) -> float:
        return self.pruned_cost / self.dense_cost


def calibration_batches(data: ImageSet, count: int, batch_size: int, image_size: int, seed: int,
                        device: torch.device | str | None = None) -> list:
    """``count`` calibration images drawn by ``seed``, batched on ``device``; under ``torchrun``,
    this rank's exact shard of them (:func:`vitrim.distributed.shard`)."""
    from vitrim import distributed

    if len(data) == 0:
        raise DataError("the calibration set is empty")
    if count > len(data):
        raise DataError(f"asked for {count} calibration images but {data.name} has {len(data)}")
    if count < distributed.world_size():
        raise DataError(f"{count} calibration images for {distributed.world_size()} processes; use at least "
                        f"one image per process (--calib)")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:count]
    return list(data.take(distributed.shard(order)).batches(batch_size, image_size=image_size, device=device))


DEFAULT_KD_ALPHA = 0.5  # the labels at half weight: +0.9 points over the logits alone after half an epoch at 197
# tokens (benchmarks/results/recovery_screen_197_half_epoch.md), where they fit the model's classes


def resolve_distillation(cfg: PruneConfig, model: VisionTransformer, train: ImageSet | None, custom_loss: bool,
                         say: Callable[[str], None] = lambda text: None) -> PruneConfig:
    """``cfg`` with the distillation's ``kd_alpha`` and ``kd_augment`` decided (its objective decided).

    ``kd_alpha=None`` mixes the labels' cross-entropy in at :data:`DEFAULT_KD_ALPHA` when the
    objective distils logits and ``train``'s labels fit ``model``'s classes, else distils the
    logits (or features) alone; an explicit ``kd_alpha`` below 1 where the labels cannot be used is
    an error naming why. ``kd_augment=None`` is no augmentation: the teacher labels the very image
    the student sees, and random crops measured worse in the same screen.
    """
    cfg = dataclasses.replace(cfg, kd_augment=cfg.kd_augment or "none")
    if not (cfg.distils or cfg.step_kd_images):
        return cfg
    why = None
    if cfg.objective == "features":
        why = "objective 'features' distils the output features, not the logits"
    elif custom_loss:
        why = "a custom loss decides what the labels mean"
    elif train is None or not train.labelled:
        why = "the training images have no labels"
    else:
        try:
            train.check_classes(model.config.num_classes)
        except DataError as exc:
            why = f"the labels do not fit the model's classes ({exc})"
    if why is None:
        return dataclasses.replace(cfg, kd_alpha=DEFAULT_KD_ALPHA if cfg.kd_alpha is None else cfg.kd_alpha)
    if cfg.kd_alpha is not None and cfg.kd_alpha < 1:
        raise ConfigError(f"kd_alpha={cfg.kd_alpha:g} (--kd-alpha) mixes the labels' cross-entropy into the "
                          f"distillation, but {why}; drop it to distil the teacher alone")
    if cfg.kd_alpha is None and cfg.objective == "labels":
        say(f"distilling the teacher's logits alone: {why}")
    return dataclasses.replace(cfg, kd_alpha=1.0)


def resolve_objective(cfg: PruneConfig, model: Any, data: ImageSet | None, loss_fn: LossFn = classification_loss,
                      say: Callable[[str], None] = lambda text: None, *,
                      batch_loss: BatchLoss | None = None) -> PruneConfig:
    """``cfg`` with the objective ``"auto"`` decided and the structures it implies, checked against
    ``model`` (any supported family) and ``data`` before any work.

    ``"auto"`` is ``"features"`` when the model's head is not a classifier (a pooler or none) or
    the data has no labels, else ``"labels"`` (always, with a custom ``loss_fn`` or ``batch_loss``). Under
    ``"features"``, default structures leave ``embed`` out, so the output width stays.
    """
    from vitrim.adapters import head_kind

    head = head_kind(model)
    objective = cfg.objective
    unlabelled = data is not None and not data.labelled
    custom = loss_fn is not classification_loss or batch_loss is not None
    if objective == "auto":
        objective = "features" if not custom and (head != "classifier" or unlabelled) else "labels"
        if objective == "features":  # the usual choice goes unsaid
            why = "the model has no classifier" if head != "classifier" else "the images have no labels"
            say(f"objective 'auto': features ({why})")
    needs_loss = cfg.saliency != "magnitude"
    if objective == "labels" and head == "none" and (needs_loss or cfg.distils):
        raise ConfigError(f"{type(model).__name__} has no head (no classifier or pooler), so objective='labels' "
                          f"has no logits; use objective='features' (--objective features) to prune it by the "
                          f"distance to its dense output features")
    if objective == "labels" and unlabelled and needs_loss and not custom:
        data.require_labels(f"the {cfg.saliency} saliency of objective='labels'")
    if objective == "features" and custom:
        raise ConfigError(f"{'loss' if batch_loss is not None else 'loss_fn'} applies to objective='labels'; drop it, "
                          f"or pass objective='labels'")
    if objective == "features" and cfg.saliency == "taylor":
        say("objective 'features' with the taylor saliency: the distance is at its minimum at the dense model, so "
            "the first step sees no first-order signal; fisher or taylor2 (--saliency) rank by the second-order term")
    structures = cfg.structures
    if objective == "features" and cfg._default_structures and "embed" in structures:
        structures = tuple(s for s in structures if s != "embed")
        say("objective 'features': embedding channels are not pruned, so the output width stays (list 'embed' "
            "in structures, --structures, to prune them)")
    return dataclasses.replace(cfg, objective=objective, structures=structures)


def prune(model: VisionTransformer, target: str = "flops=0.5", data: ImageSet | None = None, *,
          recover: str = "reconstruct", train_data: ImageSet | None = None, config: PruneConfig | None = None,
          cost: CostModel | None = None, loss_fn: LossFn = classification_loss, progress: bool = True,
          log: Callable[[str], None] | None = None, device: str | torch.device | None = None,
          forward: Forward | None = None, plan: PrunePlan | None = None, loss: BatchLoss | None = None,
          **options: Any) -> PruneResult:
    """Prune ``model`` to ``target`` (e.g. ``"flops=0.5"``) and recover; ``model`` is not modified.

    ``loss(model, batch)``: the task's loss, the batch's mean as a scalar, ``batch`` being
    ``(images, labels)``; it replaces the classification loss for the saliency, ``model`` being
    vitrim's canonical ViT (``model(x)`` its logits) whichever family ``model`` is. (A dense
    model goes through :func:`vitrim.prune`, which prunes its backbone.)

    ``data`` supplies calibration images; ``train_data`` the images for ``recover="kd"`` or
    ``"reconstruct+kd"`` (defaults to ``data``). ``options`` are :class:`PruneConfig` fields
    (``structures``, ``exclude``, ``saliency``, ``steps``, ``round_to``, ``objective``, ...).
    With ``objective="labels"`` the loss is ``loss_fn`` (cross-entropy) on the labels; with
    ``"features"`` (the ``"auto"`` choice for a backbone or unlabelled images) it is the
    :class:`~vitrim.prune.saliency.FeatureDistance` to the dense model's output features, for
    saliency and distillation alike, so no labels are needed. ``forward(model, images)`` (with a
    custom ``loss_fn``) is what the loss reads instead of the logits: a dense model's head on the
    backbone being pruned (:func:`vitrim.dense.prune.prune_dense`), so any task prunes the same way.

    ``plan``: a dimension plan already chosen for this model (e.g. by :mod:`vitrim.joint`, which
    timed exactly that shape): it is applied as is, in one step, and only the recovery runs.

    ``device``: where scoring, reconstruction and distillation run (``None``: where ``model`` is);
    the result lives there too, and ``model`` stays where it was. Under ``torchrun`` each rank
    scores and reconstructs on its shard of the calibration images, the sums all-reduced, so
    every rank ends with the same plan and weights; only rank 0 logs.
    """
    if loss is not None and (loss_fn is not classification_loss or forward is not None):
        raise ConfigError("pass the loss one way: loss=fn(model, batch) -> scalar, or loss_fn with forward "
                          "(per sample)")
    if type(model).__name__ == "DenseModel":  # its pyramid and head stay: vitrim.prune prunes its backbone
        raise ConfigError("a dense model's backbone is pruned by vitrim.prune(model, ...) (or "
                          "vitrim.dense.prune.prune_dense); vitrim.prune.prune takes the backbone itself")
    cfg = config or PruneConfig(target=target, recover=recover, **options)
    from vitrim import distributed
    from vitrim.adapters import family, from_canonical, is_converted, metadata, to_canonical
    from vitrim.device import module_device, resolve_device

    target_device = module_device(model) if device is None else resolve_device(device)
    progress = progress and distributed.is_main()
    say = (log if distributed.is_main() else None) or (lambda text: None)
    cfg = resolve_objective(cfg, model, data, loss_fn, say, batch_loss=loss)
    found = family(model)  # an unknown model: one error naming the supported families
    kept = tuple(s for s in cfg.structures if s in found.prunable)
    if not kept:
        raise ConfigError(f"{type(model).__name__} can be pruned by {', '.join(found.prunable)} only "
                          f"(asked for {', '.join(cfg.structures)})")
    if kept != cfg.structures:
        # e.g. Hugging Face and timm attention share one head width for queries, keys and values
        # (timm's fused kernel also derives the softmax scale from it): heads are pruned whole there
        cfg = dataclasses.replace(cfg, structures=kept)
    if is_converted(model):
        meta = metadata(model)
        result = prune(to_canonical(model), data=data, train_data=train_data, config=cfg, cost=cost, loss_fn=loss_fn,
                       progress=progress, log=log, device=target_device, forward=forward, plan=plan, loss=loss)
        result.model = from_canonical(result.model, meta)
        return result
    if model.config.qk_norm and "qk" in cfg.structures:
        # q/k norm spans each head's channels, so they cannot be pruned one by one
        cfg = dataclasses.replace(cfg, structures=tuple(s for s in cfg.structures if s != "qk"))
    if cfg.round_to == "auto" and plan is None:
        from vitrim.prune.roundto import measured_round_to

        multiple, _ = measured_round_to(model, batch=cfg.latency_batch, device=target_device)
        say(f"round_to auto: kept widths are multiples of {multiple} (measured on this device)")
        cfg = dataclasses.replace(cfg, round_to=multiple)
    check_prunable(model, cfg)
    cfg = resolve_distillation(cfg, model, train_data if train_data is not None else data,
                               loss_fn is not classification_loss or loss is not None, say)
    if plan is not None:
        check_plan(plan, model.config, cfg.structures)
    if data is None and (cfg.saliency != "magnitude" or cfg.reconstructs):
        raise DataError("pruning needs calibration data (pass data=ImageSet)")
    measured_budget = cost is None and cfg.metric == "latency" and plan is None and cfg.latency_corrections > 0
    if cost is None and cfg.metric == "latency" and plan is None:
        from vitrim.prune.latency import LatencyTable

        table = None
        if distributed.is_main():  # one table, measured once, so every rank searches alike
            table = LatencyTable.for_model(model, batch_size=cfg.latency_batch, progress=progress,
                                           device=target_device)
        cost = distributed.broadcast_object(table).cost_model()
    elif cost is None:  # a given plan is not searched: its kept share of the latency is not measured
        cost = CostModel("flops" if cfg.metric == "latency" else cfg.metric)
    dense = model.eval() if module_device(model) == target_device else copy.deepcopy(model).to(target_device).eval()
    dense_cost = cost.total(dense.config)
    image_size = dense.config.image_size
    batches = (calibration_batches(data, cfg.calib_images, cfg.batch_size, image_size, cfg.seed, target_device)
               if data is not None else None)
    features = cfg.objective == "features"
    if features and "embed" in cfg.structures:
        say("objective 'features': pruning embedding channels narrows the output features; the removed "
            "channels count as lost in the distance")
    if features and batches:
        with torch.no_grad():  # each batch's target, computed once: the dense features (calib x N x C floats)
            batches = [(x, output_features(dense, x)) for x, _ in batches]
    current = copy.deepcopy(dense)
    embed_index = list(range(dense.config.embed_dim))
    steps: list[dict[str, Any]] = []
    if plan is not None:
        current = slice_model(current.cpu(), plan).to(target_device)
        embed_index = [embed_index[c] for c in plan.embed]
        steps.append({"step": 1, "kept_ratio": cost.total(current.config) / dense_cost, "removed": {},
                      "plan": "given"})
        say(f"given plan: {cost.metric} kept {steps[0]['kept_ratio']:.4f}")
    def search_step(step: int, step_target: float, label: str) -> None:
        """Score ``current``, search it down to ``step_target`` and slice it (one pruning step)."""
        nonlocal current, embed_index
        if cfg.saliency == "magnitude":
            scores = saliency(current, None, "magnitude")
        else:
            probe = torch.Generator().manual_seed(cfg.seed * 1000 + step) if cfg.saliency in SECOND_ORDER else None
            scoring = (dict(loss_fn=FeatureDistance(embed_index, probe), forward=output_features) if features
                       else dict(loss_fn=loss_fn, forward=forward, batch_loss=loss))
            scores = saliency(current, batches, cfg.saliency, progress=progress, total=len(batches), **scoring)
        search = Search(current.config, scores, cost, structures=cfg.structures, exclude=cfg.exclude,
                        round_to=cfg.round_to)
        start = search.total_cost()
        bar = progress_bar(None, total=100, desc=f"search {label}", enabled=progress,
                           bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")
        with bar:
            def on_step(cand, now, start=start, step_target=step_target, bar=bar):
                done = (start - now) / max(start - step_target, 1e-12)
                bar.n = min(100, int(100 * done))
                bar.set_postfix_str(f"{cost.metric} {now / dense_cost:.3f}", refresh=False)

            removed = search.run(step_target, cfg.tolerance, on_step=on_step)
        found = search.plan()
        current = slice_model(current.cpu(), found).to(target_device)  # surgery indexes on the CPU
        embed_index = [embed_index[c] for c in found.embed]
        counts: dict[str, int] = {}
        for cand in removed:
            counts[cand.kind] = counts.get(cand.kind, 0) + 1
        record = {"step": step, "kept_ratio": cost.total(current.config) / dense_cost, "removed": counts}
        steps.append(record)
        say(f"step {label}: {cost.metric} kept {record['kept_ratio']:.4f}, removed {counts}")

    for step in range(1, cfg.steps + 1 if plan is None else 1):
        search_step(step, dense_cost * cfg.ratio ** (step / cfg.steps), f"{step}/{cfg.steps}")
        if cfg.step_kd_images and step < cfg.steps and train_data is not None:
            with tempfile.TemporaryDirectory() as tmp:
                distill(current, dense, train_data, tmp, images=cfg.step_kd_images, lr=cfg.kd_lr,
                        batch_size=cfg.kd_batch_size, seed=cfg.seed, progress=progress, objective=cfg.objective,
                        embed_index=embed_index, device=target_device, alpha=cfg.kd_alpha, augment=cfg.kd_augment)
    if measured_budget:  # the table's sum misses what the whole model costs: prune on to the measured budget
        for correction in range(1, cfg.latency_corrections + 2):
            measured, unstable = measured_latency_ratio(dense, current, cfg.latency_batch, target_device)
            steps[-1]["measured_ratio"] = measured
            say(f"measured latency: {measured:.3f} of dense at batch {cfg.latency_batch} (target {cfg.ratio:g})")
            if measured <= cfg.ratio * (1 + MEASURED_TOLERANCE) or correction > cfg.latency_corrections:
                break
            if unstable:  # a noisy figure would prune for nothing, and pruning cannot be undone
                say(f"warning: not pruning further by a timing that is not to be trusted ({unstable}); time "
                    f"on an idle machine, or pass latency_corrections=0 (--latency-corrections 0)")
                break
            table_now = cost.total(current.config) / dense_cost
            search_step(cfg.steps + correction, dense_cost * table_now * cfg.ratio / measured,
                        f"correction {correction}/{cfg.latency_corrections}")
    if cfg.reconstructs:
        images = torch.cat([x for x, _ in batches])
        reconstruct(dense, current, embed_index, images, batch_size=cfg.batch_size, progress=progress)
    if cfg.distils:
        train = train_data if train_data is not None else data
        if train is None:
            raise DataError(f"recover={cfg.recover!r} needs training images (train_data=ImageSet)")
        with tempfile.TemporaryDirectory() as tmp:
            distill(current, dense, train, tmp, epochs=cfg.kd_epochs, images=cfg.kd_images, lr=cfg.kd_lr,
                    batch_size=cfg.kd_batch_size, seed=cfg.seed, progress=progress, objective=cfg.objective,
                    embed_index=embed_index, device=target_device, alpha=cfg.kd_alpha, augment=cfg.kd_augment)
    result = PruneResult(current.eval(), dense_cost, cost.total(current.config), cost.metric, steps, embed_index, cfg)
    corrected = bool(steps) and steps[-1]["step"] > cfg.steps  # pruned past the table's target on purpose
    if plan is None and not corrected and result.kept_ratio < cfg.ratio * (1 - cfg.tolerance) - 1e-9:
        say(f"warning: kept {result.kept_ratio:.3f} of the {cost.metric}, below the target {cfg.ratio:g}: the "
            f"structures left to remove were coarser than the budget (a smaller round_to, --round-to, or "
            f"more --steps gets closer)")
    return result


MEASURED_TOLERANCE = 0.03  # a measured latency this far over the target counts as met (timing noise)


def measured_latency_ratio(dense: Any, pruned: Any, batch_size: int, device: torch.device) -> tuple[float, str | None]:
    """``(ratio, unstable)``: ``pruned``'s latency over ``dense``'s at ``batch_size``, timed interleaved
    on ``device`` at the thread count the latency table used (median of 20 rounds), and why the
    timing is not to be trusted (None when it is); under ``torchrun`` rank 0 times them and every
    rank gets its figures."""
    from vitrim import distributed
    from vitrim.bench.latency import paired_latency

    figures = None
    if distributed.is_main():
        timed = paired_latency(dense, pruned, batch_size, threads=torch.get_num_threads(), runs=20, device=device)
        figures = (timed["second_ms"] / timed["first_ms"], timed["unstable_reason"])
    ratio, unstable = distributed.broadcast_object(figures)
    return float(ratio), unstable


def module_names(config) -> list[str]:
    """The names ``exclude`` patterns match: ``embed``, ``blocks.I.attn``, ``blocks.I.mlp``."""
    return ["embed"] + [f"blocks.{i}.{part}" for i in range(config.depth) for part in ("attn", "mlp")]


def check_plan(plan: PrunePlan, config: Any, structures: tuple[str, ...]) -> None:
    """Refuse a given plan that does not fit ``config`` or removes structures outside ``structures``."""
    if len(plan.blocks) != config.depth:
        raise ConfigError(f"the given plan has {len(plan.blocks)} blocks but the model has {config.depth}; pass a "
                          f"plan searched for this model")
    used = {"embed"} if len(plan.embed) < config.embed_dim else set()
    for bp, d in zip(plan.blocks, config.blocks):
        if d.attention and not bp.attention:
            used.add("attn_layer")
        if d.mlp and not bp.mlp_on:
            used.add("mlp_layer")
        if bp.attention:
            used |= {k for k, kept, full in (("heads", len(bp.heads), d.heads), ("qk", len(bp.qk[0]), d.qk_dim),
                                             ("v", len(bp.v[0]), d.v_dim)) if kept < full}
        if bp.mlp_on and len(bp.mlp) < d.mlp_dim:
            used.add("mlp")
    outside = sorted(used - set(structures))
    if outside:
        raise ConfigError(f"the given plan removes {', '.join(outside)}, which this model or these settings keep "
                          f"(structures {', '.join(structures)}); search the plan with those structures only")


def check_prunable(model: VisionTransformer, cfg: PruneConfig) -> None:
    """Refuse, before any work, settings this model cannot honour and weights not worth pruning."""
    import fnmatch

    names = module_names(model.config)
    for pattern in cfg.exclude:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ConfigError(f"exclude pattern {pattern!r} matches no module of this model; names look like "
                              f"{', '.join(names[:3])} ... {names[-1]} (globs such as 'blocks.*.mlp' work)")
    blocks = model.config.blocks
    widths = {"qk": max((b.qk_dim for b in blocks), default=0), "v": max((b.v_dim for b in blocks), default=0),
              "mlp": max((b.mlp_dim for b in blocks), default=0), "embed": model.config.embed_dim}
    for kind, width in widths.items():
        if kind in cfg.structures and width and cfg.round_to > width:
            raise ConfigError(f"round_to {cfg.round_to} (--round-to) is wider than the widest {kind} layer "
                              f"({width}): kept widths could not be multiples of it and the budget would be "
                              f"missed; use a round_to of at most {width} (default 8)")
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ConfigError(f"the model's weights hold NaN or infinity ({name}); pruning would carry them into "
                              f"the result — load a model saved before training diverged")
