"""The stacked pipeline: prune + recover, static token reduction, export + quantize.

With a joint ``target`` (``latency=0.15`` or ``flops=0.3``) the pruning ratio, the token keep
ratio and layers, and the precision are chosen together by :func:`vitrim.joint.plan_joint`
first; the choice and its runner-ups go into the report.

Every stage is measured the same way — accuracy on the test images, size on disk, FLOPs per
image, latency of all stages timed together at the end in one process (interleaved rounds,
median and spread, one thread count, an unstable figure flagged) at batch 1 and 64 — and every transform keeps its numeric check (export against
PyTorch, quantized against fp32 in ONNX Runtime).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from vitrim.bench.any_model import compare_models
from vitrim.bench.flops import model_cost
from vitrim.bench.latency import unstable_warning
from vitrim.data.dataset import ImageSet
from vitrim.errors import ConfigError
from vitrim.fsutil import atomic_dir, atomic_path, check_output_dir, write_json, write_text
from vitrim.io import WEIGHTS_FILE, save
from vitrim.joint import FP32, JointConfig, parse_joint_target, plan_joint, plan_table
from vitrim.models import VisionTransformer
from vitrim.report import format_table, human
from vitrim.tokens.model import check_method as check_token_method


def parse_tokens(spec: str | None) -> tuple[str, float] | None:
    """``"keep=0.7"`` -> ("keep", 0.7); a threshold (per-image counts) cannot be exported."""
    if spec is None:
        return None
    knob, sep, value = spec.partition("=")
    if knob == "tau":
        raise ConfigError("a dynamic per-image token model (tau=...) cannot be exported to ONNX; use keep=RATIO")
    if knob != "keep" or not sep:
        raise ConfigError(f"tokens {spec!r} must look like keep=0.7")
    try:
        return "keep", float(value)
    except ValueError:
        raise ConfigError(f"token keep ratio {value!r} is not a number") from None


@dataclass
class CompressConfig:
    prune: str | None = "flops=0.5"
    recover: str = "reconstruct"
    prune_calib: int = 512
    tokens: str | None = "keep=0.7"
    token_method: str = "tome"  # merging keeps accuracy best without training (token benchmark)
    token_layers: tuple[int, ...] | None = None
    quant: str | None = "w8a8"
    calib: int = 128
    calib_method: str = "minmax"
    threads: int | None = None
    runs: int = 30
    target: str | None = None  # a joint budget (latency=0.15, flops=0.3): chooses prune, tokens and quant
    joint: JointConfig | None = None  # the joint search's grids and measurement (its target is ``target``)

    def __post_init__(self) -> None:
        from vitrim.prune.api import PruneConfig
        from vitrim.quant.quantize import CALIBRATORS, SCHEME_CALIBRATORS, SCHEMES

        if self.prune is not None:
            PruneConfig(target=self.prune, recover=self.recover)
        parse_tokens(self.tokens)
        check_token_method(self.token_method)
        if self.quant is not None and self.quant not in SCHEMES:
            raise ConfigError(f"unknown quantization scheme {self.quant!r}; use one of {', '.join(SCHEMES)}")
        if self.calib_method not in CALIBRATORS:
            raise ConfigError(f"unknown calibrator {self.calib_method!r}; use one of {', '.join(CALIBRATORS)}")
        if self.quant is not None and self.calib_method not in SCHEME_CALIBRATORS[self.quant]:
            raise ConfigError(f"{self.quant} takes the calibrator(s) {', '.join(SCHEME_CALIBRATORS[self.quant])}, "
                              f"not {self.calib_method!r}")
        if min(self.calib, self.prune_calib, self.runs) < 1:
            raise ConfigError("calib, prune_calib and runs must be positive")
        if self.target is not None:
            metric, _ = parse_joint_target(self.target)
            precisions = (self.joint or JointConfig()).precisions if metric == "latency" else (self.quant or FP32,)
            self.joint = dataclasses.replace(self.joint or JointConfig(), target=self.target,
                                             token_method=self.token_method, threads=self.threads,
                                             precisions=precisions)

    def chosen(self, plan: Any) -> "CompressConfig":
        """These settings with the joint plan's prune ratio, token setting and precision."""
        c = plan.chosen
        return dataclasses.replace(self, target=None, joint=None,
                                   prune=None if c.prune_ratio >= 1 else f"flops={c.prune_ratio:g}",
                                   tokens=None if c.keep >= 1 else f"keep={c.keep:g}",
                                   token_layers=None if c.keep >= 1 else tuple(c.layers),
                                   quant=None if c.precision == FP32 else c.precision)


def torch_size(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


LATENCY_BATCHES = (1, 64)


def check_compress(model: VisionTransformer, train: ImageSet, cfg: CompressConfig, out_dir: str | Path) -> None:
    """Refuse, before any work, settings this model, these images or this output path cannot honour."""
    tokens = parse_tokens(cfg.tokens)
    if tokens is not None and not 0 < tokens[1] <= 1:
        raise ConfigError(f"token keep ratio must be in (0, 1], got {tokens[1]:g}; use e.g. --tokens keep=0.7")
    depth = model.config.depth
    for i in cfg.token_layers or ():
        if not 0 <= i < depth:
            raise ConfigError(f"token layer {i} is outside the model's {depth} blocks; use --layers between 0 "
                              f"and {depth - 1}")
    counts = {"prune_calib (--prune-calib)": cfg.prune_calib if cfg.prune is not None else 0,
              "calib (--calib)": cfg.calib if cfg.quant is not None else 0}
    if cfg.joint is not None:
        counts["joint search images (--calib-joint + --joint-eval)"] = cfg.joint.calib + cfg.joint.eval_images
    for name, count in counts.items():
        if count > len(train):
            raise ConfigError(f"{name} asks for {count} images but the training set has {len(train)}; "
                              f"use at most {len(train)}")
    check_output_dir(out_dir)


def compress(model: VisionTransformer, train: ImageSet, test: ImageSet, cfg: CompressConfig, out_dir: str | Path,
             *, progress: bool = True, log: Callable[[str], None] = lambda text: None,
             device: str | torch.device | None = None) -> dict[str, Any]:
    """Run the stages in order, write the artefacts and ``report.{json,md,png}`` to ``out_dir``.

    Everything is checked before the first stage, and ``out_dir`` appears whole or not at all
    (built in a temporary sibling, swapped into place at the end). All stages are timed together
    at the end, interleaved, so each ``speedup_b*`` is the ratio of the reported ``latency_ms_b*``.

    ``device``: where the torch stages are pruned, evaluated and timed (``None``: where ``model``
    is); export, quantization and the ONNX Runtime stages run on the CPU.
    """
    from vitrim.device import module_device, resolve_device

    target = module_device(model) if device is None else resolve_device(device)
    check_compress(model, train, cfg, out_dir)
    plan = None
    if cfg.joint is not None:
        plan = plan_joint(model.cpu(), train, cfg.joint, progress=progress, log=log)
        log("joint choice:\n" + plan_table(plan))
        cfg = cfg.chosen(plan)
    with atomic_dir(out_dir) as tmp:
        stages, runners = run_stages(model, train, test, cfg, tmp, progress=progress, log=log, device=target,
                                     dimension_plan=plan.dimension_plan if plan is not None else None)
        measured = compare_models(runners, LATENCY_BATCHES, test=test, image_size=model.config.image_size,
                                  threads=cfg.threads, runs=cfg.runs, progress=progress, desc="{name}", log=log,
                                  device=target)
        for entry in stages:
            result = measured[entry["stage"]]
            entry.update(accuracy=result["accuracy"], threads=result["thread_policy"], latency=result["latency"],
                         device=result.get("device"))
        against_first(stages, "accuracy")
        report = {"config": asdict(cfg), "stages": stages}
        if plan is not None:
            report["joint"] = plan.to_dict()
        write_report(tmp, report)
    return report


def run_stages(model: VisionTransformer, train: ImageSet, test: ImageSet, cfg: CompressConfig, out: Path, *,
               progress: bool, log: Callable[[str], None],
               device: torch.device | None = None,
               dimension_plan: Any = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Build every stage; the stage entries (size, FLOPs, checks) and ``{stage: model}`` to measure.

    Pruning runs on ``device``; export and quantization on the CPU. ``dimension_plan``: the plan
    the joint search timed, applied as is instead of searching again."""
    from vitrim.prune import prune
    from vitrim.tokens import reduce_tokens, reduced_flops

    size = model.config.image_size
    check_images = next(test.batches(16, image_size=size))[0]
    stages: list[dict[str, Any]] = []
    runners: dict[str, Any] = {}

    def add(name: str, net, size_bytes: int, flops: float, **extra: Any) -> None:
        stages.append({"stage": name, "size_bytes": size_bytes, "flops": flops, **extra})
        runners[name] = net

    add("torch fp32 dense", model, torch_size(model), model_cost(model.config).flops)
    current: nn.Module = model
    if cfg.prune is not None:
        result = prune(model, cfg.prune, train, recover=cfg.recover, train_data=train, calib_images=cfg.prune_calib,
                       progress=progress, device=device, plan=dimension_plan)
        result.model.cpu()
        current = result.model
        save(current, out / "pruned")
        add("torch fp32 pruned", current, (out / "pruned" / WEIGHTS_FILE).stat().st_size,
            model_cost(current.config).flops, kept_ratio=result.kept_ratio)
    tokens = parse_tokens(cfg.tokens)
    if tokens is not None:
        current = reduce_tokens(current.cpu(), cfg.token_method, layers=cfg.token_layers, keep=tokens[1])
        add(f"+ tokens ({cfg.token_method} keep={tokens[1]:g})", current, torch_size(current),
            reduced_flops(current, check_images))
    if cfg.quant is not None:
        onnx_stages(current, out, cfg, check_images, train.subset(cfg.calib), add, stages[-1]["flops"], log=log,
                    torch_model=current)
    return stages, runners


def onnx_stages(current: nn.Module, out: Path, cfg: CompressConfig, check_images: torch.Tensor, calib: Any,
                add: Callable[..., None], flops: float, *, log: Callable[[str], None],
                torch_model: nn.Module | None = None, wrap: Callable[[Any], Any] = lambda runner: runner) -> None:
    """The ``ORT fp32`` and ``ORT {cfg.quant}`` stages of ``current`` (the last torch stage, whose
    ``flops`` they keep): exported and checked against it on ``check_images``, quantized on ``calib``
    (``torch_model``: the vitrim model blockwise calibration simulates). ``add(name, runner, size,
    flops, **extra)`` records a stage; ``wrap`` adapts an ONNX Runtime session to the caller's runner."""
    from vitrim.quant import OnnxModel, export, quantize

    current.cpu()  # ONNX export and the checks against PyTorch run on the CPU
    exported = export(current, out / "model-fp32.onnx", check_images=check_images, threads=cfg.threads)
    add("ORT fp32", wrap(OnnxModel(exported.path, threads=cfg.threads)), exported.size_bytes, flops,
        check=exported.check.to_dict(), device="cpu")
    quantized = quantize(exported.path, out / f"model-{cfg.quant}.onnx", cfg.quant, calib=calib,
                         calibrator=cfg.calib_method, threads=cfg.threads, torch_model=torch_model, log=log)
    calibrated = cfg.quant == "w8a8" or cfg.calib_method == "blockwise"
    add(f"ORT {cfg.quant}" + (f" ({cfg.calib_method})" if calibrated else ""),
        wrap(OnnxModel(quantized.path, threads=cfg.threads)), quantized.size_bytes, flops,
        check=quantized.check.to_dict(), device="cpu")


def against_first(stages: list[dict[str, Any]], score: str) -> None:
    """Each stage's ``latency_ms_b*`` / ``speedup_b*`` from its ``latency`` stats, its size ratio
    and its drop in ``score`` (points) against the first stage."""
    first = stages[0]
    for entry in stages:
        for batch, stats in entry["latency"].items():
            entry[f"latency_ms_b{batch}"], entry[f"speedup_b{batch}"] = stats["median_ms"], stats["speedup"]
        entry["size_ratio"] = first["size_bytes"] / entry["size_bytes"]
        entry["drop_points"] = (first[score] - entry[score]) * 100


def _ms(stage: dict[str, Any], batch: int, digits: int) -> str:
    """``latency_ms_b{batch}`` with ``*`` when that figure is flagged unstable."""
    stats = stage.get("latency", {}).get(str(batch))
    mark = "*" if stats is not None and not stats["stable"] else ""
    return f"{stage[f'latency_ms_b{batch}']:.{digits}f}{mark}"


SCORES = {"accuracy": "accuracy", "map": "mAP", "miou": "mIoU"}  # a stage's score -> its column label


def report_score(report: dict[str, Any]) -> tuple[str, str, tuple[int, ...]]:
    """``(score key, label, latency batches)`` of a compress report (a classifier's: accuracy, 1 and 64)."""
    key = report.get("score", "accuracy")
    return key, SCORES[key], tuple(report.get("batches", LATENCY_BATCHES))


def stage_table(report: dict[str, Any]) -> str:
    """The stages side by side; a ``*`` marks an unstable latency, explained under the table."""
    key, label, batches = report_score(report)
    unit = "%" if key == "accuracy" else ""
    rows = [[s["stage"], f"{s[key] * 100:.2f}{unit}", f"{s['drop_points']:+.2f}", human(s["size_bytes"], "B"),
             f"{s['size_ratio']:.2f}x", human(s["flops"])]
            + [cell for b in batches for cell in (_ms(s, b, 2 if b == 1 else 1), f"{s[f'speedup_b{b}']:.2f}x")]
            for s in report["stages"]]
    header = [label, "drop pt", "size", "smaller", "FLOPs"] + [h for b in batches for h in (f"ms b={b}", "faster")]
    table = format_table(rows, ["stage"] + header)
    return table + unstable_warning((s["stage"], batch, stats) for s in report["stages"]
                                    for batch, stats in s.get("latency", {}).items())


def write_report(out_dir: Path, report: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        key, label, batches = report_score(report)
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for batch, marker in zip(batches, "os^v"):
            xs = [s[f"latency_ms_b{batch}"] / report["stages"][0][f"latency_ms_b{batch}"] for s in report["stages"]]
            ys = [s[key] * 100 for s in report["stages"]]
            ax.plot(xs, ys, marker + "-", label=f"batch {batch}")
            for x, y, s in zip(xs, ys, report["stages"]):
                ax.annotate(s["stage"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("latency relative to dense torch fp32")
        ax.set_ylabel("top-1 accuracy (%)" if key == "accuracy" else f"{label} (x100)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic_path(out_dir / "report.png") as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        plt.close(fig)
        report["plot"] = "report.png"
    except ImportError:
        pass
    write_json(out_dir / "report.json", report)
    task = f" ({report['task']} model)" if report.get("task") else ""
    text = [f"# vitrim compress report{task}", "", "```", stage_table(report), "```", ""]
    if report.get("joint"):
        text += joint_section(report["joint"])
    if report.get("plot"):
        text += ["![accuracy vs latency](report.png)", ""]
    write_text(out_dir / "report.md", "\n".join(text))


def joint_section(joint: dict[str, Any]) -> list[str]:
    """The report's lines on the joint choice: the budget, the choice and its runner-ups."""
    from vitrim.joint import Candidate, JointPlan

    def cand(d: dict[str, Any]) -> Candidate:
        return Candidate(**{k: (tuple(v) if k == "layers" else v) for k, v in d.items() if k != "loss"})

    plan = JointPlan(joint["metric"], joint["ratio"], cand(joint["chosen"]), [cand(c) for c in joint["runner_ups"]],
                     met=joint["met"])
    what = "latency relative to dense torch fp32 eager" if plan.metric == "latency" else "FLOPs ratio"
    return [f"## Joint choice for {plan.metric}={plan.ratio:g}", "",
            f"Estimated loss increase per lever (dL, calibration cross-entropy; dims: "
            f"{joint['curves']['prune_loss']}), {what} predicted and measured:", "",
            "```", plan_table(plan), "```", ""]


__all__ = ["CompressConfig", "against_first", "check_compress", "compress", "onnx_stages", "parse_tokens", "stage_table",
           "write_report"]
