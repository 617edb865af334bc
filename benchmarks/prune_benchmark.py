"""vitrim pruning vs Torch-Pruning vs magnitude, at FLOPs targets, with one recovery budget.

Every method prunes the same trained model to the same FLOPs target; every pruned model gets the
same recovery (none, or distillation from the dense model on the same images); accuracy on the
Fashion-MNIST test set, params, FLOPs, and latency measured against the dense model in this
process (alternating runs, median, fixed threads) at batch 1 and 64.

    python benchmarks/prune_benchmark.py --targets 0.75 0.5 0.25 --kd-images 60000

A method ``vitrim-fisher@latency`` budgets measured latency instead of FLOPs (same target value).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, load_reference, speedup_cell, write_results  # noqa: E402

import vitrim  # noqa: E402
from vitrim.bench.flops import model_cost  # noqa: E402
from vitrim.bench.latency import paired_latency  # noqa: E402
from vitrim.data import load_dataset  # noqa: E402
from vitrim.models import BlockDims, VisionTransformer  # noqa: E402
from vitrim.prune import prune  # noqa: E402
from vitrim.prune.api import calibration_batches  # noqa: E402
from vitrim.prune.recover import distillation_config, feature_distillation  # noqa: E402
from vitrim.train import fit  # noqa: E402


def vitrim_pruned(model, ratio, method, recover, train, args):
    """``method`` is ``vitrim-SALIENCY`` (a FLOPs budget) or ``vitrim-SALIENCY@latency`` (the same
    fraction of measured latency, from the lookup table at batch 1)."""
    saliency, _, metric = method.split("-", 1)[1].partition("@")
    result = prune(model, f"{metric or 'flops'}={ratio}", train, recover=recover, saliency=saliency,
                   calib_images=args.calib, steps=args.steps, progress=False)
    return result.model, result.embed_index


def canonical_from_tp(pruned: VisionTransformer, dense: VisionTransformer, num_heads: dict) -> VisionTransformer:
    """Rebuild a valid vitrim model from Torch-Pruning's output (whose attributes it leaves stale)."""
    blocks = []
    for block, dense_dims in zip(pruned.blocks, dense.config.blocks):
        heads = num_heads[block.attn.qkv]
        head_dim = block.attn.qkv.out_features // (3 * heads)
        blocks.append(BlockDims(heads, head_dim, head_dim, block.mlp.fc1.out_features, attn_scale=dense_dims.scale))
    cfg = dense.config.replace(embed_dim=pruned.patch_embed.proj.out_channels,
                               blocks=[b.__dict__ for b in blocks])
    model = VisionTransformer(cfg)
    model.load_state_dict(pruned.state_dict())
    return model.eval()


def use_fused_reshape(model: VisionTransformer) -> None:
    """Swap each attention's forward for the explicit (B, N, 3, H, D) form Torch-Pruning traces.

    Numerically the same as vitrim's split (the qkv rows are laid out [q | k | v] either way).
    """
    for block in model.blocks:
        attn = block.attn

        def forward(x, bias=None, capture=None, attn=attn):  # vitrim's Attention.forward signature
            B, N, _ = x.shape
            qkv = attn.qkv(x).reshape(B, N, 3, attn.heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D)
            q, k, v = qkv.unbind(0)
            weights = (q @ k.transpose(-2, -1) * attn.scale).softmax(dim=-1)
            return attn.proj((weights @ v).transpose(1, 2).reshape(B, N, -1))

        attn.forward = forward


def tp_prune_at_ratio(dense, pruning_ratio, importance_name, batches):
    import torch_pruning as tp

    model = copy.deepcopy(dense).eval()
    use_fused_reshape(model)
    example = batches[0][0][:1]
    num_heads = {b.attn.qkv: b.attn.heads for b in model.blocks}
    if importance_name == "taylor":
        importance = tp.importance.GroupTaylorImportance()
    else:
        importance = tp.importance.GroupHessianImportance()
    pruner = tp.pruner.MetaPruner(
        model, example, importance=importance, global_pruning=True, pruning_ratio=pruning_ratio,
        num_heads=num_heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=pruning_ratio,
        ignored_layers=[model.head], unwrapped_parameters=[(model.pos_embed, 2), (model.cls_token, 2)], round_to=8)
    model.zero_grad()
    if importance_name == "taylor":
        for x, y in batches:
            F.cross_entropy(model(x), y).backward()
    else:
        importance.zero_grad()
        for x, y in batches:
            for i in range(len(y)):
                model.zero_grad()
                F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
                importance.accumulate_grad(model)
    pruner.step()
    if any(pruner.num_heads[block.attn.qkv] == 0 for block in model.blocks):
        return None  # every head of a block removed: no valid attention left at this ratio
    for block in model.blocks:  # Torch-Pruning leaves these stale: the hand edits its users make
        block.attn.heads = pruner.num_heads[block.attn.qkv]
        block.attn.qk_dim = block.attn.v_dim = block.attn.qkv.out_features // (3 * block.attn.heads)
    return canonical_from_tp(model, dense, pruner.num_heads)


def tp_pruned(dense, ratio, importance_name, train, args):
    """Bisection on Torch-Pruning's channel ratio until the FLOPs target is met."""
    batches = calibration_batches(train, args.tp_calib, 32, dense.config.image_size, 0)
    dense_flops = model_cost(dense.config).flops
    lo, hi, best = 0.0, 0.95, None
    for _ in range(args.bisect):
        mid = (lo + hi) / 2
        candidate = tp_prune_at_ratio(dense, mid, importance_name, batches)
        if candidate is None:  # over-pruned into an invalid model: prune less
            hi = mid
            continue
        kept = model_cost(candidate.config).flops / dense_flops
        if kept <= ratio:
            best, hi = candidate, mid
        else:
            lo = mid
    return best  # None: no valid model at or below the target


def kept_embed_channels(pruned: VisionTransformer, dense: VisionTransformer) -> list[int]:
    """The dense embedding channel of each of ``pruned``'s, found by its patch-embedding filter
    (Torch-Pruning keeps the kept filters unchanged but does not report which they were)."""
    kept = pruned.patch_embed.proj.weight.flatten(1)  # (C_kept, in*p*p)
    full = dense.patch_embed.proj.weight.flatten(1)  # (C, in*p*p)
    distance, index = torch.cdist(kept, full, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1)
    if distance.max() > 1e-5 * full.norm(dim=1).max():
        raise ValueError("a pruned patch-embedding filter matches no dense one: the embedding channels are unknown")
    return index.tolist()


def distil(student, teacher, train, args, embed_index=None, features=False):
    """Distillation of the logits; ``features``: plus the output tokens' and pooled embedding's distance."""
    cfg = distillation_config(images=args.kd_images, lr=args.kd_lr, alpha=args.kd_alpha, augment=args.kd_augment)
    loss_fn = feature_distillation(teacher, embed_index, with_logits=True) if features else None
    with tempfile.TemporaryDirectory() as tmp:
        fit(student, train, cfg, tmp, teacher=None if features else teacher, progress=False, loss_fn=loss_fn)
    return student.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fmnist-vit")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    parser.add_argument("--methods", nargs="+",
                        default=["vitrim-taylor2", "vitrim-fisher", "vitrim-magnitude", "tp-taylor", "tp-hessian"])
    parser.add_argument("--recover", nargs="+", default=["none", "reconstruct", "kd"],
                        help="none | reconstruct | kd | reconstruct+kd, each kd also as kd+features (the logits' "
                             "and the output features' distance); reconstruct applies to vitrim methods only "
                             "(Torch-Pruning gets the same kd for reconstruct+kd)")
    parser.add_argument("--note", default="", help="a sentence for the summary (what this run covers)")
    parser.add_argument("--calib", type=int, default=512)
    parser.add_argument("--tp-calib", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--bisect", type=int, default=7)
    parser.add_argument("--kd-images", type=int, default=60000)
    parser.add_argument("--kd-lr", type=float, default=2e-4)
    parser.add_argument("--kd-alpha", type=float, default=1.0,
                        help="the teacher's weight; below 1 mixes in the labels' cross-entropy")
    parser.add_argument("--kd-augment", default="crop", choices=("crop", "none"))
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="prune_benchmark")
    args = parser.parse_args()
    known = {"none", "reconstruct", "kd", "kd+features", "reconstruct+kd", "reconstruct+kd+features"}
    if unknown := [r for r in args.recover if r not in known]:
        parser.error(f"unknown --recover {', '.join(unknown)}; use {', '.join(sorted(known))}")
    if any(m.startswith("tp-") for m in args.methods) and importlib.util.find_spec("torch_pruning") is None:
        parser.error("the tp-* methods need Torch-Pruning: .venv/bin/pip install -e '.[bench]'")
    if not 0 <= args.kd_alpha <= 1:
        parser.error(f"--kd-alpha is the teacher's weight, between 0 and 1, got {args.kd_alpha}")
    dense, test, dense_acc = load_reference(args.model, args.threads, args.eval_limit)
    train = load_dataset("fashion-mnist", "train").resized(dense.config.image_size)
    dense_cost = model_cost(dense.config)
    rows: list[dict[str, Any]] = []
    for ratio in args.targets:
        for method in args.methods:
            started = time.perf_counter()
            if method.startswith("vitrim-"):  # the unrecovered model only when a recovery starts from it
                needs_base = any(not r.startswith("reconstruct") for r in args.recover)
                base, base_index = (vitrim_pruned(dense, ratio, method, "none", train, args) if needs_base
                                    else (None, None))
            else:
                base = tp_pruned(dense, ratio, method.split("-", 1)[1], train, args)
                if base is None:
                    rows.append({"target": ratio, "method": method, "recover": "none", "accuracy": None,
                                 "note": "no valid model at this target (a block lost every head)"})
                    print(rows[-1], flush=True)
                    continue
                distils_features = any(r.endswith("+features") for r in args.recover)
                base_index = kept_embed_channels(base, dense) if distils_features else None
            prune_seconds = time.perf_counter() - started
            reconstructed = None
            for recover in args.recover:
                if recover.startswith("reconstruct") and not method.startswith("vitrim-"):
                    kd_alone = recover.removeprefix("reconstruct+")
                    if not kd_alone.startswith("kd") or kd_alone in args.recover:
                        continue
                    recover = kd_alone  # Torch-Pruning has no reconstruction: the same distillation alone
                t0 = time.perf_counter()
                if recover.startswith("reconstruct") and reconstructed is None:
                    reconstructed = vitrim_pruned(dense, ratio, method, "reconstruct", train, args)
                start, embed_index = reconstructed if recover.startswith("reconstruct") else (base, base_index)
                stages = recover.split("+")
                model = (distil(copy.deepcopy(start), dense, train, args, embed_index, "features" in stages)
                         if "kd" in stages else start)
                cost = model_cost(model.config)
                row = {"target": ratio, "method": method, "recover": recover,
                       "accuracy": vitrim.evaluate(model, test)["accuracy"],
                       "params": cost.params, "flops": cost.flops, "flops_ratio": cost.flops / dense_cost.flops,
                       "prune_seconds": prune_seconds, "recover_seconds": time.perf_counter() - t0}
                row["drop_points"] = (dense_acc - row["accuracy"]) * 100
                for batch in (1, 64):
                    lat = paired_latency(dense, model, batch, threads=args.threads, runs=args.runs)
                    row[f"speedup_b{batch}"] = lat["speedup"]
                    row[f"latency_ms_b{batch}"] = lat["second_ms"]
                    row[f"timing_b{batch}"] = lat  # both medians, each one's p90/p10 spread, stable
                rows.append(row)
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    result = {"environment": environment(), "model": args.model, "dense_accuracy": dense_acc,
              "dense_params": dense_cost.params, "dense_flops": dense_cost.flops, "kd_images": args.kd_images,
              "rows": rows}
    lines = [f"# Pruning benchmark: {args.model}", "",
             f"Dense accuracy {dense_acc * 100:.2f}%, {dense_cost.params / 1e6:.2f} M params, "
             f"{dense_cost.flops / 1e6:.1f} MFLOPs. Distillation budget: {args.kd_images} images. "
             f"Command: `{result['environment']['command']}`", *([args.note] if args.note else []), "",
             "Speed-ups: the pruned model timed alternately with dense, median of the runs; in brackets each "
             "one's p90/p10 spread (dense / pruned); `*`: over the stability limit.", "",
             "| target | method | recovery | accuracy | drop (pt) | FLOPs kept | params | speedup b=1 | speedup b=64 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["accuracy"] is None:
            lines.append(f"| {r['target']} | {r['method']} | {r['recover']} | {r['note']} | | | | | |")
            continue
        lines.append(f"| {r['target']} | {r['method']} | {r['recover']} | {r['accuracy'] * 100:.2f}% | "
                     f"{r['drop_points']:.2f} | {r['flops_ratio']:.3f} | {r['params'] / 1e6:.2f} M | "
                     f"{speedup_cell(r, 1)} | {speedup_cell(r, 64)} |")
    write_results(args.name, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
