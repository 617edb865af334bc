"""One budget over dimensions, tokens and bits (``vitrim compress --target latency=R``) against the
best *sequential* choice at the same latency targets, on one machine, in one process.

Joint: :func:`vitrim.joint.measure_levers` once (Fisher plans + reconstructed loss per pruning
ratio, token loss curve, quantization error per scheme, latency of every setting), then
:func:`vitrim.joint.choose` per target. Sequential: for every pruning ratio x on the grid and
every int8 scheme (``--sequential-schemes``), prune to x, take the largest token keep ratio
predicted to fit the target after that scheme; the most accurate of those measured within the
target is the sequential baseline (an oracle over x and the scheme: it reads the test set, which
the joint search never does). Beside it, the sequential setting a user could pick without the test
set: the lowest loss, measured as built, on the training images the joint search holds out. Both
build their settings with the same functions (``vitrim.prune`` with the plan the joint search timed
+ reconstruct, static merging, ONNX Runtime quantization) and are timed together, interleaved with
dense torch fp32 eager, at the budget's batch size.

    python benchmarks/joint_benchmark.py --model fmnist-vit-197 --targets 0.5 0.3 0.15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, load_reference, write_results  # noqa: E402

import vitrim  # noqa: E402
from vitrim.bench.latency import paired_latency  # noqa: E402
from vitrim.data import load_dataset  # noqa: E402
from vitrim.joint import FP32, JointConfig, choose, measure_levers, plan_table, resolve_layers  # noqa: E402


class Builder:
    """Builds (and caches) settings as they run: pruned models per ratio, then tokens and bits."""

    def __init__(self, dense: Any, train: Any, test: Any, work: Path, args: argparse.Namespace,
                 levers: Any) -> None:
        self.dense, self.train, self.test, self.work, self.args = dense, train, test, work, args
        self.plans = levers.plans  # ratio -> the dimension plan the joint search timed
        self.held = levers.held_set  # the training images the joint search measured its losses on
        self.pruned: dict[float, Any] = {}
        self.built: dict[tuple, dict[str, Any]] = {}

    def prune(self, ratio: float) -> Any:
        if ratio >= 1:
            return self.dense
        if ratio not in self.pruned:
            result = vitrim.prune(self.dense, f"flops={ratio:g}", self.train, plan=self.plans[ratio][1],
                                  recover="reconstruct", calib_images=self.args.prune_calib, progress=False)
            self.pruned[ratio] = result.model.eval()
        return self.pruned[ratio]

    def build(self, ratio: float, keep: float, layers: tuple[int, ...], precision: str) -> dict[str, Any]:
        key = (ratio, keep, layers if keep < 1 else (), precision)
        if key not in self.built:
            from vitrim.quant import OnnxModel, quantize
            from vitrim.tokens import reduce_tokens

            net = self.prune(ratio)
            if keep < 1:
                net = reduce_tokens(net, self.args.token_method, layers=layers, keep=keep)
            if precision != FP32:
                path = self.work / f"m{len(self.built)}-{precision}.onnx"
                calib = self.train.subset(self.args.calib) if precision == "w8a8" else None
                net = OnnxModel(quantize(net, path, precision, calib=calib, threads=self.args.threads).path,
                                threads=self.args.threads)
            accuracy = vitrim.evaluate(net, self.test)["accuracy"]
            held_loss = vitrim.evaluate(net, self.held)["loss"]
            if precision != FP32:  # a fresh session: the evaluated one's memory arena grew to batch 256
                net = OnnxModel(path, threads=self.args.threads)
            self.built[key] = {"runner": net, "accuracy": accuracy, "held_out_loss": held_loss,
                               "prune_ratio": ratio, "keep": keep,
                               "layers": list(layers) if keep < 1 else [], "precision": precision}
        return self.built[key]


def sequential(levers: Any, target: float, builder: Builder, layers: tuple[int, ...],
               schemes: list[str]) -> list[dict]:
    """For each pruning ratio and scheme: the largest keep predicted to fit ``target`` after it."""
    rows = []
    for ratio in sorted(levers.plans, reverse=True):
        for scheme in schemes:
            fits = [c for c in levers.candidates if c.prune_ratio == ratio and c.precision == scheme
                    and (c.keep >= 1 or c.layers == layers) and c.predicted <= target]
            if fits:
                best = max(fits, key=lambda c: c.keep)
                rows.append(builder.build(ratio, best.keep, best.layers, scheme))
    return rows


def time_paired(dense: Any, entries: list[dict[str, Any]], args: argparse.Namespace) -> float:
    """Each setting timed interleaved with dense alone for ``args.seconds`` at least, as the joint
    search times its candidates, ``args.pairs`` times (rounds over all settings, so slow drift
    touches each alike); the median ratio counts. Records the ratios, their range and the worst
    p90/p10 spread. Returns dense's median milliseconds over all pairs."""
    for entry in entries:
        entry.update(ratios=[], ms=[], spread=1.0, stable=True)
    dense_ms = []
    for _ in range(args.pairs):
        for entry in entries:
            pair = paired_latency(dense, entry["runner"], args.batch, threads=args.threads,
                                  runs=max(args.runs, 20), min_seconds=args.seconds)
            entry["ratios"].append(pair["second_ms"] / pair["first_ms"])
            entry["ms"].append(pair["second_ms"])
            entry["spread"] = max(entry["spread"], pair["first_spread"], pair["second_spread"])
            entry["stable"] = entry["stable"] and pair["stable"]
            dense_ms.append(pair["first_ms"])
    for entry in entries:
        entry["latency_ratio"] = statistics.median(entry["ratios"])
        entry["latency_ms"] = statistics.median(entry.pop("ms"))
    return statistics.median(dense_ms)


def best_within(rows: list[dict], target: float, by: str = "accuracy") -> dict | None:
    """Among rows measured within ``target``: the most accurate on the test images, or with
    ``by="held_out_loss"`` the lowest loss on held-out training images (ties: the faster)."""
    inside = [r for r in rows if r["latency_ratio"] <= target]
    if not inside:
        return None
    if by == "accuracy":
        return max(inside, key=lambda r: (r["accuracy"], -r["latency_ratio"]))
    return min(inside, key=lambda r: (r[by], r["latency_ratio"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fmnist-vit-197")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.3, 0.15])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prune-ratios", type=float, nargs="+", default=[1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    parser.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "w8a8", "w8-dynamic"])
    parser.add_argument("--sequential-schemes", nargs="+", default=["w8a8", "w8-dynamic"],
                        help="int8 schemes the sequential baseline may end with")
    parser.add_argument("--token-method", default="tome")
    parser.add_argument("--prune-loss", default="measured")
    parser.add_argument("--joint-calib", type=int, default=256)
    parser.add_argument("--joint-eval", type=int, default=512)
    parser.add_argument("--prune-calib", type=int, default=512)
    parser.add_argument("--calib", type=int, default=128, help="w8a8 calibration images")
    parser.add_argument("--eval-limit", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=JointConfig.min_seconds,
                        help="each timing against dense lasts at least this long, in the search and the comparison")
    parser.add_argument("--pairs", type=int, default=5,
                        help="times each setting is timed against dense in the final comparison (median counts)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="joint_benchmark")
    args = parser.parse_args()

    dense, test, dense_acc = load_reference(args.model, args.threads, args.eval_limit)
    train = load_dataset("fashion-mnist", "train").resized(dense.config.image_size)
    cfg = JointConfig(target=f"latency={max(args.targets)}", prune_ratios=tuple(args.prune_ratios),
                      keeps=tuple(args.keeps), precisions=tuple(args.precisions), token_method=args.token_method,
                      prune_loss=args.prune_loss, calib=args.joint_calib, eval_images=args.joint_eval,
                      batch=args.batch, runs=args.runs, min_seconds=args.seconds, threads=args.threads)
    levers = measure_levers(dense, train, cfg, progress=False, log=print)
    default_layers = resolve_layers(None, dense.config.depth)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vitrim-joint-bench-") as tmp:
        builder = Builder(dense, train, test, Path(tmp), args, levers)
        for target in args.targets:
            plan = choose(levers, target, log=print)
            print(plan_table(plan))
            c = plan.chosen
            joint = builder.build(c.prune_ratio, c.keep, c.layers, c.precision)
            seq = sequential(levers, target, builder, default_layers, args.sequential_schemes)
            results.append({"target": target, "plan": plan.to_dict(), "joint": joint, "sequential": seq})
        dense_ms = time_paired(dense, list(builder.built.values()), args)
    for entry in builder.built.values():
        entry.pop("runner", None)
    for r in results:
        r["best_sequential"] = best_within(r["sequential"], r["target"])
        r["sequential_by_held_out_loss"] = best_within(r["sequential"], r["target"], by="held_out_loss")
    md = [f"# Joint budget vs best sequential: {args.model}", "",
          f"Dense torch fp32 eager: {dense_acc * 100:.2f}% on {len(test)} test images, {dense_ms:.2f} ms at "
          f"batch {args.batch}, {args.threads} threads. Command: `{environment()['command']}`", "",
          f"Each setting was timed interleaved with dense alone, {args.pairs} times over rounds of all settings "
          f"(at least {max(args.runs, 20)} runs and {args.seconds:g} s each, as the joint search times its "
          "candidates); the latency is the median of those ratios, beside their range and the worst "
          "p90/p10 spread of one timing. Every row, the joint choice included, is held to the same rule: "
          "within the target means a median ratio at or under it.", "",
          "| target | choice | setting | accuracy | drop (pt) | held-out loss | latency (median) | range of pairs "
          "| p90/p10 | stable |", "|---|---|---|---|---|---|---|---|---|---|"]

    def row(target: float, what: str, e: dict[str, Any]) -> str:
        setting = (f"prune {e['prune_ratio']:g}, keep {e['keep']:g}"
                   + (f" @{','.join(map(str, e['layers']))}" if e["layers"] else "") + f", {e['precision']}")
        over = "" if e["latency_ratio"] <= target else " (over the target)"
        return (f"| {target:g} | {what}{over} | {setting} | {e['accuracy'] * 100:.2f}% | "
                f"{(dense_acc - e['accuracy']) * 100:.2f} | {e['held_out_loss']:.4f} | {e['latency_ratio']:.3f} | "
                f"{min(e['ratios']):.3f}-{max(e['ratios']):.3f} | {e['spread']:.2f} | {e['stable']} |")

    for r in results:
        md.append(row(r["target"], "joint", r["joint"]))
        if r["best_sequential"]:
            md.append(row(r["target"], "best sequential", r["best_sequential"]))
        md += [row(r["target"], "sequential", s) for s in r["sequential"] if s is not r["best_sequential"]]
    md += ["", "## Joint against the best sequential choice", "",
           "The best sequential choice is picked by test accuracy (an oracle); the other column is the sequential "
           "setting with the lowest held-out loss, which needs no test images. The joint choice's latency is "
           "given as the search measured it while choosing, and as the final paired timing measured it. The last "
           "columns compare at equal measured latency: the most accurate sequential setting, built for any target, "
           "whose final timing is at or under the joint choice's own.", "",
           "| target | joint | joint latency (search / final) | best sequential | joint - best (pt) "
           "| at least as accurate, within the target | sequential by held-out loss | joint - that (pt) "
           "| best sequential no slower than the joint choice | joint - that (pt) |",
           "|---|---|---|---|---|---|---|---|---|---|"]

    def versus(j: dict[str, Any], other: dict[str, Any] | None) -> tuple[str, str]:
        if other is None:
            return "none measured within the target", "–"
        return f"{other['accuracy'] * 100:.2f}%", f"{(j['accuracy'] - other['accuracy']) * 100:+.2f}"

    for r in results:
        j = r["joint"]
        best, gap = versus(j, r["best_sequential"])
        held, held_gap = versus(j, r["sequential_by_held_out_loss"])
        r["joint_within"] = j["latency_ratio"] <= r["target"]
        r["met"] = r["joint_within"] and (r["best_sequential"] is None
                                          or j["accuracy"] >= r["best_sequential"]["accuracy"])
        verdict = ("yes" if r["met"] else "no") + ("" if r["joint_within"] else " (joint over the target)")
        if r["best_sequential"] is None and r["joint_within"]:
            verdict = "yes (no sequential setting within it)"
        every_sequential = {id(s): s for q in results for s in q["sequential"] if s is not j}.values()
        r["sequential_no_slower"] = best_within(list(every_sequential), j["latency_ratio"])
        equal, equal_gap = versus(j, r["sequential_no_slower"])
        searched = r["plan"]["chosen"]["measured"]
        latency = ("–" if searched is None else f"{searched:.3f}") + f" / {j['latency_ratio']:.3f}"
        md.append(f"| {r['target']:g} | {j['accuracy'] * 100:.2f}% | {latency} | {best} | {gap} | {verdict} "
                  f"| {held} | {held_gap} | {equal.replace('the target', 'its latency')} | {equal_gap} |")
    data = {"environment": environment(), "model": args.model, "dense_accuracy": dense_acc, "dense_ms": dense_ms,
            "eval_images": len(test), "results": results, "curves": levers.curves}
    write_results(args.name, data, "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
