"""Dense prediction: a ViT detector's backbone pruned to 0.8 / 0.6 / 0.4 of its FLOPs, and token
merging with unmerge on a segmenter, on a COCO-format set (``vitrim coco-synthetic``).

Pruning, per FLOPs ratio, one-shot (one saliency pass, one global search) and the same recovery
for every method (layer-wise reconstruction on the detection training images, no training):

- ``task``: Fisher saliency of the detector's own loss through the pyramid and head (vitrim's
  dense pruning, ``vitrim.dense.prune.prune_dense``);
- ``classification``: Fisher saliency of the classification loss of the same backbone with its
  classifier head (the one it was started from), on Fashion-MNIST resized to the canvas — the
  backbone pruned as a classifier, then the detection head re-attached;
- ``uniform``: every block keeps the same share of heads and MLP units (the largest-norm ones).

Then, for the ratios in ``--finetune`` (task and classification), a short recovery per kind in
``--finetune-by``: ``kd``, ``--finetune-epochs`` of distillation from the dense detector (its
feature map and head outputs, no labels; :func:`vitrim.dense.prune.distill_dense` at
``--kd-lr``), and ``labels``, detection training on the labels at ``--finetune-lr``.
Reported: COCO mAP / AP50 on the val split, backbone and whole-model FLOPs, the
latency of the whole detector at batch 1 and 8 (all models timed interleaved in one process) and
the dimension plan per block. The segmenter: ToMe merging at ``--keeps``, restored to the full
grid for the head, no training: mIoU, FLOPs and speed-up (interleaved).

    .venv/bin/python benchmarks/dense_benchmark.py --detector runs/detector --segmenter runs/segmenter \\
        --data data/coco48 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results  # noqa: E402

import vitrim  # noqa: E402
from vitrim.bench.latency import interleaved_latency  # noqa: E402
from vitrim.data.coco import load_coco  # noqa: E402
from vitrim.dense.cost import dense_cost  # noqa: E402
from vitrim.dense.prune import BACKBONE_STRUCTURES, distill_dense, prune_dense  # noqa: E402
from vitrim.dense.train import dense_train_config, evaluate_dense, fit_dense  # noqa: E402
from vitrim.models.config import ViTConfig  # noqa: E402
from vitrim.prune.cost import CostModel  # noqa: E402
from vitrim.prune.plan import BlockPlan, PrunePlan  # noqa: E402
from vitrim.prune.report import dimension_plan  # noqa: E402
from vitrim.prune.saliency import magnitude_saliency, saliency  # noqa: E402
from vitrim.prune.search import Search  # noqa: E402

METHODS = ("task", "classification", "uniform")


def split(root: Path, name: str, model: Any):
    """The split at ``model``'s input size, normalised by its mean and std (as ``vitrim`` does)."""
    cfg = model.config
    return load_coco(root, name, cfg.image_size, cfg.in_chans).for_model(cfg)


def classification_saliency(backbone: Any, images: int, seed: int) -> dict[str, torch.Tensor]:
    """Fisher saliency of the classification loss of ``backbone`` (a classifier) on Fashion-MNIST
    training images resized to its input."""
    from vitrim.data import load_dataset
    from vitrim.prune.api import calibration_batches

    data = load_dataset("fashion-mnist", "train").subset(images).resized(backbone.config.image_size)
    batches = calibration_batches(data, images, 32, backbone.config.image_size, seed)
    return saliency(backbone, batches, "fisher", total=len(batches), progress=False)


def classification_plan(backbone: Any, scores: dict[str, torch.Tensor], ratio: float, round_to: int) -> PrunePlan:
    """The global search on the classification saliency ``scores``, to ``ratio`` of the FLOPs."""
    cost = CostModel("flops")
    search = Search(backbone.config, scores, cost, structures=BACKBONE_STRUCTURES, round_to=round_to)
    search.run(cost.total(backbone.config) * ratio)
    return search.plan()


def uniform_plan(backbone: Any, ratio: float, round_to: int) -> PrunePlan:
    """Every block keeps the same number of heads (``ratio`` of them, rounded) and the same share of
    MLP units (a multiple of ``round_to``), the largest-norm ones, at the largest share whose
    backbone FLOPs are within ``ratio`` of the dense backbone's (fewer heads when even the smallest
    MLP does not fit)."""
    cfg: ViTConfig = backbone.config
    scores = magnitude_saliency(backbone)
    cost = CostModel("flops")
    budget = cost.total(cfg) * ratio

    def plan_at(heads: int, share: float) -> PrunePlan:
        blocks = []
        for i, d in enumerate(cfg.blocks):
            kept = sorted(scores[f"{i}.heads"].argsort(descending=True)[:heads].tolist())
            units = max(round_to, math.floor(d.mlp_dim * share / round_to) * round_to)
            mlp = sorted(scores[f"{i}.mlp"].argsort(descending=True)[:units].tolist())
            blocks.append(BlockPlan(kept, [list(range(d.qk_dim)) for _ in kept], [list(range(d.v_dim)) for _ in kept],
                                    mlp))
        return PrunePlan(list(range(cfg.embed_dim)), blocks)

    def fits(plan: PrunePlan) -> bool:
        return cost.total(plan.pruned_config(cfg)) <= budget

    most = min(d.heads for d in cfg.blocks)
    for heads in range(max(1, min(most, round(most * ratio))), 0, -1):
        if not fits(plan_at(heads, 0.0)):
            continue
        low, high = 0.0, 1.0
        for _ in range(30):  # bisection on the MLP share
            mid = (low + high) / 2
            low, high = (mid, high) if fits(plan_at(heads, mid)) else (low, mid)
        return plan_at(heads, low)
    raise ValueError(f"no uniform plan reaches {ratio} of the backbone's FLOPs")


def training_record(directory: str) -> dict[str, Any]:
    """How a model directory was trained: its command, epochs and last epoch's record."""
    import json

    training = json.loads((Path(directory) / "config.json").read_text()).get("training", {})
    history = training.get("history") or [{}]
    return {"command": training.get("command"), "epochs": len(training.get("history") or []), "last": history[-1]}


def finetune(model: Any, dense: Any, train: Any, kind: str, args: argparse.Namespace) -> Any:
    """A copy of ``model`` distilled from ``dense`` (``kd``) or trained on the labels (``labels``)."""
    tuned = copy.deepcopy(model)
    with tempfile.TemporaryDirectory() as work:  # its checkpoints
        if kind == "kd":
            return distill_dense(tuned, dense, train, work, kd_epochs=args.finetune_epochs, kd_lr=args.kd_lr,
                                 seed=args.seed, progress=False)
        cfg = dense_train_config(epochs=args.finetune_epochs, lr=args.finetune_lr, warmup_epochs=0, seed=0)
        return fit_dense(tuned, train, cfg, work, progress=False).model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detector", required=True, help="a trained detector directory")
    parser.add_argument("--segmenter", default=None, help="a trained segmenter directory (token merging)")
    parser.add_argument("--data", required=True, help="the COCO-format directory both were trained on")
    parser.add_argument("--ratios", default="0.8,0.6,0.4")
    parser.add_argument("--calib", type=int, default=512, help="calibration images (saliency, reconstruction)")
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--finetune", default="0.8,0.6", help="ratios fine-tuned after pruning (empty: none)")
    parser.add_argument("--finetune-by", default="kd,labels", help="recoveries after pruning: kd and/or labels")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--kd-lr", type=float, default=2e-4, help="distillation learning rate")
    parser.add_argument("--finetune-lr", type=float, default=5e-5, help="label training learning rate")
    parser.add_argument("--keeps", default="1,0.8,0.7,0.5")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="first N train and val images (a smoke test)")
    parser.add_argument("--name", default="dense_benchmark")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.data)
    ratios = [float(r) for r in args.ratios.split(",")]
    tuned_ratios = [float(r) for r in args.finetune.split(",") if r]
    kinds = [k for k in args.finetune_by.split(",") if k]
    if set(kinds) - {"kd", "labels"}:
        parser.error(f"--finetune-by takes kd and/or labels, got {args.finetune_by!r}")

    detector = vitrim.load(args.detector).eval()
    train, val = split(root, "train", detector), split(root, "val", detector)
    if args.limit:
        train, val = train.subset(min(args.limit, len(train))), val.subset(min(args.limit, len(val)))
    calib = min(args.calib, len(train))
    results: dict[str, Any] = {"environment": environment(), "settings": vars(args), "detector": {}, "segmenter": {},
                               "references": {"detector": training_record(args.detector)}}
    if args.segmenter:
        results["references"]["segmenter"] = training_record(args.segmenter)
    dense = {"metrics": evaluate_dense(detector, val), **dense_cost(detector),
             "dimension_plan": dimension_plan(detector.config)}
    results["detector"]["dense"] = dense
    print(f"dense detector: mAP {dense['metrics']['map'] * 100:.2f}", flush=True)
    models: dict[str, Any] = {"dense": detector}
    classification_scores = classification_saliency(detector.backbone, calib, args.seed)
    for ratio in ratios:
        plans = {"classification": classification_plan(detector.backbone, classification_scores, ratio, args.round_to),
                 "uniform": uniform_plan(detector.backbone, ratio, args.round_to)}
        for method in METHODS:
            started = time.perf_counter()
            options = dict(steps=1, round_to=args.round_to, calib_images=calib, seed=args.seed, progress=False,
                           recover="reconstruct")
            if method in plans:
                options["plan"] = plans[method]
            pruned, result = prune_dense(detector, f"flops={ratio}", train, **options)
            pruned.eval()
            key = f"{method}@{ratio:g}"
            entry = {"method": method, "ratio": ratio, "kept_ratio": result.kept_ratio,
                     "metrics": evaluate_dense(pruned, val), **dense_cost(pruned),
                     "dimension_plan": dimension_plan(pruned.config),
                     "prune_seconds": round(time.perf_counter() - started, 1)}
            for kind in kinds if ratio in tuned_ratios and method != "uniform" else ():
                started = time.perf_counter()
                tuned = finetune(pruned, detector, train, kind, args)
                entry.setdefault("finetuned", {})[kind] = {"metrics": evaluate_dense(tuned.eval(), val),
                                                           "seconds": round(time.perf_counter() - started, 1)}
            results["detector"][key] = entry
            models[key] = pruned
            tuned_text = "".join(f", {kind} {done['metrics']['map'] * 100:.2f}"
                                 for kind, done in entry.get("finetuned", {}).items())
            print(f"{key}: kept {result.kept_ratio:.3f}, mAP {entry['metrics']['map'] * 100:.2f}{tuned_text}",
                  flush=True)
    timed = interleaved_latency(models, (1, 8), threads=args.threads, runs=args.runs)  # every detector, interleaved
    for key in models:
        results["detector"][key]["latency"] = {str(b): timed[key][b] for b in (1, 8)}

    if args.segmenter:
        from vitrim.dense.tokens import dense_token_sweep
        from vitrim.tokens import reduce_tokens

        segmenter = vitrim.load(args.segmenter).eval()
        seg_val = split(root, "val", segmenter)
        seg_val = seg_val.subset(min(args.limit, len(seg_val))) if args.limit else seg_val
        view = reduce_tokens(segmenter.backbone, "tome")
        rows, seg_dense = dense_token_sweep(segmenter, view, "keep", [float(k) for k in args.keeps.split(",")],
                                            val=seg_val, batch_sizes=(1, 8), threads=args.threads, runs=args.runs)
        results["segmenter"] = {"method": "tome", "layers": list(view.layers), "dense": seg_dense, "rows": rows}
    write_results(args.name, results, markdown(results))


def markdown(results: dict[str, Any]) -> str:
    det = results["detector"]
    dense = det["dense"]
    lines = [f"# Dense prediction: pruning a detector's backbone, merging a segmenter's tokens\n",
             f"`{results['environment']['command']}`\n",
             f"{results['environment']['device']}, {results['environment']['threads']} threads. Every detector "
             f"below was timed interleaved with the others in one process (median of "
             f"{results['settings']['runs']}; `*`: spread p90/p10 over the stability limit).\n",
             "Reference models (`make dense-reference` makes them): "
             + "; ".join(f"{name}: `{ref['command']}` ({ref['epochs']} epochs)"
                         for name, ref in results["references"].items()) + "\n",
             "## Detector: backbone pruned by the task loss, by the classification loss, and uniformly\n",
             "One-shot pruning, layer-wise reconstruction on the detection training images (no training); "
             f"then, where a figure is given, {results['settings']['finetune_epochs']} epoch(s) of distillation "
             f"from the dense detector (kd: feature map and head outputs, no labels, lr "
             f"{results['settings']['kd_lr']:g}) or of detection training on the labels (lr "
             f"{results['settings']['finetune_lr']:g}).\n",
             "| model | backbone FLOPs | model FLOPs | mAP | AP50 | mAP after kd | mAP after labels | "
             "b=1 ms (speed-up) | b=8 ms (speed-up) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, e in det.items():
        lat = e["latency"]
        cells = [f"{lat[b]['median_ms']:.1f} ({lat[b]['speedup']:.2f}x){'' if lat[b]['stable'] else '*'}"
                 for b in ("1", "8")]
        tuned = [f"{e['finetuned'][k]['metrics']['map'] * 100:.2f}" if k in e.get("finetuned", {}) else "-"
                 for k in ("kd", "labels")]
        lines.append(f"| {key} | {e['backbone_flops'] / dense['backbone_flops']:.3f} | "
                     f"{e['flops'] / dense['flops']:.3f} | {e['metrics']['map'] * 100:.2f} | "
                     f"{e['metrics']['ap50'] * 100:.2f} | {tuned[0]} | {tuned[1]} | {cells[0]} | {cells[1]} |")
    depth = len(dense["dimension_plan"])
    lines += ["", "### Dimension plans (heads x q/k / v dims per head, then MLP units, per block; - : sub-layer removed)\n",
              "| model | " + " | ".join(f"block {i}" for i in range(depth)) + " |", "|---|" + "---|" * depth]
    for key, e in det.items():
        cells = [(f"{b['heads']}x{b['qk_dim']}/{b['v_dim']}" if b["attention"] else "-")
                 + f" / {b['mlp_dim'] if b['mlp'] else '-'}" for b in e["dimension_plan"]]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    seg = results.get("segmenter")
    if seg:
        base = seg["dense"]["metrics"]
        lines += ["", f"## Segmenter: ToMe merging after blocks {seg['layers']}, unmerged for the head, no training\n",
                  f"Unreduced: mIoU {base['miou'] * 100:.2f}%, pixel accuracy {base['pixel_accuracy'] * 100:.2f}%.\n",
                  "| keep | mIoU | pixel acc. | backbone FLOPs | model FLOPs | speed-up b=1 | speed-up b=8 |",
                  "|---|---|---|---|---|---|---|"]
        for r in seg["rows"]:
            marks = {b: "" if r["latency"][b]["stable"] and seg["dense"]["latency"][b]["stable"] else "*"
                     for b in ("1", "8")}
            lines.append(f"| {r['keep']:g} | {r['metrics']['miou'] * 100:.2f} | "
                         f"{r['metrics']['pixel_accuracy'] * 100:.2f} | {r['backbone_flops_ratio']:.3f} | "
                         f"{r['flops_ratio']:.3f} | {r['speedup_b1']:.2f}x{marks['1']} | "
                         f"{r['speedup_b8']:.2f}x{marks['8']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
