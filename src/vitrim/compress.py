"""The stacked pipeline: prune + recover, static token reduction, export + quantize.

Every stage is measured the same way — accuracy on the test images, size on disk, FLOPs per
image, latency against the dense torch model in one process (alternating runs, median, fixed
threads) at batch 1 and 64 — and every transform keeps its numeric check (export against
PyTorch, quantized against fp32 in ONNX Runtime).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from vitrim.bench.accuracy import evaluate
from vitrim.bench.flops import model_cost
from vitrim.bench.latency import paired_latency
from vitrim.data.dataset import ImageSet
from vitrim.errors import ConfigError
from vitrim.fsutil import atomic_path, write_json, write_text
from vitrim.io import WEIGHTS_FILE, save
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


def torch_size(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def compress(model: VisionTransformer, train: ImageSet, test: ImageSet, cfg: CompressConfig, out_dir: str | Path,
             *, progress: bool = True, log: Callable[[str], None] = lambda text: None) -> dict[str, Any]:
    """Run the stages in order, write the artefacts and ``report.{json,md,png}`` to ``out_dir``."""
    from vitrim.prune import prune
    from vitrim.tokens import reduce_tokens, reduced_flops

    out_dir = Path(out_dir)
    size = model.config.image_size
    check_images = next(test.batches(16, image_size=size))[0]
    stages: list[dict[str, Any]] = []

    def add(name: str, net, size_bytes: int, flops: float, **extra: Any) -> None:
        log(f"measuring {name}")
        entry = {"stage": name, "size_bytes": size_bytes, "flops": flops, **extra,
                 "accuracy": evaluate(net, test, image_size=size, progress=progress, desc=name)["accuracy"]}
        for batch in (1, 64):
            lat = paired_latency(model, net, batch, threads=cfg.threads, runs=cfg.runs)
            entry[f"latency_ms_b{batch}"] = lat["second_ms"]
            entry[f"speedup_b{batch}"] = lat["speedup"]
        stages.append(entry)

    add("torch fp32 dense", model, torch_size(model), model_cost(model.config).flops)
    current: nn.Module = model
    if cfg.prune is not None:
        result = prune(model, cfg.prune, train, recover=cfg.recover, train_data=train, calib_images=cfg.prune_calib,
                       progress=progress)
        current = result.model
        save(current, out_dir / "pruned")
        add("torch fp32 pruned", current, (out_dir / "pruned" / WEIGHTS_FILE).stat().st_size,
            model_cost(current.config).flops, kept_ratio=result.kept_ratio)
    tokens = parse_tokens(cfg.tokens)
    if tokens is not None:
        current = reduce_tokens(current, cfg.token_method, layers=cfg.token_layers, keep=tokens[1])
        add(f"+ tokens ({cfg.token_method} keep={tokens[1]:g})", current, torch_size(current),
            reduced_flops(current, check_images))
    flops = stages[-1]["flops"]
    if cfg.quant is not None:
        from vitrim.quant import OnnxModel, export, quantize

        exported = export(current, out_dir / "model-fp32.onnx", check_images=check_images, threads=cfg.threads)
        add("ORT fp32", OnnxModel(exported.path, threads=cfg.threads), exported.size_bytes, flops,
            check=exported.check.to_dict())
        quantized = quantize(exported.path, out_dir / f"model-{cfg.quant}.onnx", cfg.quant,
                             calib=train.subset(cfg.calib), calibrator=cfg.calib_method, threads=cfg.threads,
                             torch_model=current, log=log)
        calibrated = cfg.quant == "w8a8" or cfg.calib_method == "blockwise"
        add(f"ORT {cfg.quant}" + (f" ({cfg.calib_method})" if calibrated else ""),
            OnnxModel(quantized.path, threads=cfg.threads), quantized.size_bytes, flops,
            check=quantized.check.to_dict())
    dense = stages[0]
    for entry in stages:
        entry["size_ratio"] = dense["size_bytes"] / entry["size_bytes"]
        entry["drop_points"] = (dense["accuracy"] - entry["accuracy"]) * 100
    report = {"config": asdict(cfg), "stages": stages}
    write_report(out_dir, report)
    return report


def stage_table(report: dict[str, Any]) -> str:
    rows = [[s["stage"], f"{s['accuracy'] * 100:.2f}%", f"{s['drop_points']:+.2f}", human(s["size_bytes"], "B"),
             f"{s['size_ratio']:.2f}x", human(s["flops"]), f"{s['latency_ms_b1']:.2f}", f"{s['speedup_b1']:.2f}x",
             f"{s['latency_ms_b64']:.1f}", f"{s['speedup_b64']:.2f}x"] for s in report["stages"]]
    return format_table(rows, ["stage", "accuracy", "drop pt", "size", "smaller", "FLOPs", "ms b=1", "faster",
                               "ms b=64", "faster"])


def write_report(out_dir: Path, report: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4))
        for batch, marker in ((1, "o"), (64, "s")):
            xs = [s[f"latency_ms_b{batch}"] / report["stages"][0][f"latency_ms_b{batch}"] for s in report["stages"]]
            ys = [s["accuracy"] * 100 for s in report["stages"]]
            ax.plot(xs, ys, marker + "-", label=f"batch {batch}")
            for x, y, s in zip(xs, ys, report["stages"]):
                ax.annotate(s["stage"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("latency relative to dense torch fp32")
        ax.set_ylabel("top-1 accuracy (%)")
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
    text = ["# vitrim compress report", "", "```", stage_table(report), "```", ""]
    if report.get("plot"):
        text += ["![accuracy vs latency](report.png)", ""]
    write_text(out_dir / "report.md", "\n".join(text))


__all__ = ["CompressConfig", "compress", "parse_tokens", "stage_table"]
