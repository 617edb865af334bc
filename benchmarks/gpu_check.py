"""GPU check: prune a DeiT-S-shaped vitrim ViT to half its FLOPs on the GPU, distil it, evaluate it
and time dense vs pruned with CUDA events; writes benchmarks/results/gpu_check.{json,md}.

Random weights and random images pseudo-labelled by the dense model (no download, no data set):
a check that pruning, distillation and timing work on this machine's GPU(s), and how fast the
pruned model runs there; the agreement with the dense model is not an accuracy.

    python benchmarks/gpu_check.py                                  # one GPU
    torchrun --nproc_per_node 4 benchmarks/gpu_check.py             # 4 GPUs: distillation is data-parallel
    python benchmarks/gpu_check.py --cpu-dry-run --out-dir /tmp/gc  # the same pipeline, tiny model, CPU

Without CUDA (and without ``--cpu-dry-run``) it prints one line and exits 0. Under torchrun every
rank scores its share of the calibration images (``vitrim.prune`` all-reduces the saliency) and
distils data-parallel; rank 0 evaluates, times and writes. The dry run writes
gpu_check_cpu_dry_run.{json,md}, never gpu_check.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import vitrim  # noqa: E402
from vitrim import distributed  # noqa: E402
from vitrim.adapters.random_data import pseudo_labelled  # noqa: E402
from vitrim.bench.flops import model_cost  # noqa: E402
from vitrim.data.dataset import normalize  # noqa: E402
from vitrim.device import device_info, synchronize  # noqa: E402
from vitrim.models import ViTConfig, VisionTransformer, uniform_config  # noqa: E402
from vitrim.train import TrainConfig  # noqa: E402
from vitrim.train.loop import distillation_loss, parameter_groups  # noqa: E402

NO_CUDA = ("gpu_check: no CUDA device here (torch {torch}, CUDA build: {cuda}); nothing to check — run it on a "
           "machine with an NVIDIA GPU, or pass --cpu-dry-run to test the script on the CPU")
TARGET = 0.5  # keep half the FLOPs
# (depth, width, heads, image, patch, classes): DeiT-S at 224x224, and the dry run's tiny stand-in
SHAPES = {"deit-s": (12, 384, 6, 224, 16, 1000), "tiny": (4, 64, 4, 32, 8, 10)}
# settings the dry run overrides to finish in seconds
DRY_RUN = dict(calib=32, calib_batch=16, steps=2, kd_steps=20, kd_batch=16, eval_images=128, batch=[1, 16], runs=5,
               warmup=2, dtype="fp32")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(shape: str, seed: int = 0) -> VisionTransformer:
    """The canonical ViT at ``shape`` with random weights, the same on every rank (CPU init from ``seed``).

    vitrim's init zeroes the head (a trained model's starting point); here it gets small random
    weights too, so the dense model's predictions, and the loss the saliency differentiates, are
    not constant.
    """
    depth, width, heads, image, patch, classes = SHAPES[shape]
    torch.manual_seed(seed)
    model = vitrim.create(uniform_config(depth, width, heads, image_size=image, patch_size=patch,
                                         num_classes=classes))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 and not p.any():
                p.normal_(0.0, 0.02)
    return model.eval()


def random_images(cfg: ViTConfig, count: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``count`` uniform random images (as :func:`pseudo_labelled` draws them), normalised, on ``device``."""
    raw = torch.randint(0, 256, (count, cfg.in_chans, cfg.image_size, cfg.image_size), generator=generator,
                        dtype=torch.uint8)
    return normalize(raw.to(device).float().div_(255.0), cfg.mean, cfg.std)


def prune_on_device(dense: VisionTransformer, args: argparse.Namespace, device: torch.device
                    ) -> tuple[VisionTransformer, dict[str, Any]]:
    """``vitrim.prune`` to half the FLOPs with Fisher saliency on pseudo-labelled random images,
    scored on ``device``; no recovery (distillation follows). Every rank calls it: under torchrun
    each scores its share of the calibration images and the sums are all-reduced before the search.
    """
    calib = pseudo_labelled(dense, args.calib)  # on the CPU, the same images and labels on every rank
    synchronize(device)
    started = time.perf_counter()
    result = vitrim.prune(dense, f"flops={TARGET}", calib, recover="none", saliency="fisher",
                          calib_images=args.calib, batch_size=args.calib_batch, steps=args.steps, progress=False,
                          device=device)
    synchronize(device)
    return result.model.to(device).eval(), {"prune_seconds": time.perf_counter() - started,
                                            "calib_images": args.calib, "prune_steps": args.steps}


def share_model(model: VisionTransformer | None) -> VisionTransformer:
    """Rank 0's pruned model on every rank (config and CPU weights broadcast), on the CPU."""
    payload = None
    if model is not None:
        payload = (model.config.to_dict(), {k: v.cpu() for k, v in model.state_dict().items()})
    config, state = distributed.broadcast_object(payload)
    shared = VisionTransformer(ViTConfig.from_dict(config))
    shared.load_state_dict(state)
    return shared.eval()


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to ``dtype`` on ``device`` (nothing for fp32)."""
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def distil(student: VisionTransformer, teacher: VisionTransformer, args: argparse.Namespace, device: torch.device,
           dtype: torch.dtype) -> dict[str, Any]:
    """``args.kd_steps`` steps of logit distillation on fresh random images, data-parallel over the ranks.

    The recipe of :func:`vitrim.prune.recover.distill` with ``alpha=1`` (random images have no
    labels): KL to the teacher's logits (T=1), AdamW (weight decay 0.01, none on norms and
    embeddings), 5% warm-up then cosine to lr/100, gradient clipping at 1. Each rank draws its own
    images, so the global batch is ``kd_batch`` x world size.
    """
    world, rank = distributed.world_size(), distributed.rank()
    wrapped: nn.Module = student
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(student, device_ids=ids)  # a removed sub-layer has no parameters
    cfg = TrainConfig(epochs=1, lr=args.lr, min_lr=args.lr * 0.01, warmup_epochs=0.05, weight_decay=0.01,
                      batch_size=args.kd_batch)
    optimizer = torch.optim.AdamW(parameter_groups(student, cfg.weight_decay), lr=cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    generator = torch.Generator().manual_seed(1000 + rank)
    teacher.eval()
    wrapped.train()
    losses: list[float] = []
    synchronize(device)
    started = time.perf_counter()
    for step in range(args.kd_steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(step, args.kd_steps, args.kd_steps)
        x = random_images(student.config, args.kd_batch, generator, device)
        with autocast(device, dtype):
            with torch.no_grad():
                target = teacher(x).float()
            loss = distillation_loss(wrapped(x).float(), target, cfg.distill_temperature)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if step in (0, args.kd_steps - 1) or step % 50 == 0:
            losses.append(float(loss.detach()))
    synchronize(device)
    seconds = time.perf_counter() - started
    student.eval()
    return {"kd_steps": args.kd_steps, "kd_batch_per_rank": args.kd_batch, "kd_global_batch": args.kd_batch * world,
            "kd_lr": args.lr, "kd_loss_first": losses[0], "kd_loss_last": losses[-1], "kd_seconds": seconds,
            "kd_images_per_s": args.kd_steps * args.kd_batch * world / seconds}


@torch.no_grad()
def agreement(model: VisionTransformer, dense: VisionTransformer, images: torch.Tensor, batch: int) -> float:
    """Share of ``images`` on which ``model``'s top-1 class is ``dense``'s (fp32)."""
    same = 0
    for x in images.split(batch):
        same += int((model(x).argmax(-1) == dense(x).argmax(-1)).sum())
    return same / images.shape[0]


class Timer:
    """Milliseconds of one call: CUDA events on a GPU (recorded around the call, read after a
    synchronize), the wall clock on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    @contextlib.contextmanager
    def time(self, into: list[float]) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            torch.cuda.synchronize()
            into.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            yield
            into.append((time.perf_counter() - started) * 1000)


@torch.inference_mode()
def paired_timing(dense: VisionTransformer, pruned: VisionTransformer, args: argparse.Namespace,
                  device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Median and p10-p90 ms per forward of dense and pruned (weights cast to ``dtype``), alternated
    run by run after ``args.warmup`` warm-up runs each, at every batch size of ``args.batch``."""
    models = {"dense": copy.deepcopy(dense).to(dtype).eval(), "pruned": copy.deepcopy(pruned).to(dtype).eval()}
    timer, cfg = Timer(device), dense.config
    out: dict[str, Any] = {}
    for batch in args.batch:
        x = torch.randn(batch, cfg.in_chans, cfg.image_size, cfg.image_size, device=device, dtype=dtype)
        for model in models.values():
            for _ in range(args.warmup):
                model(x)
        synchronize(device)
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.runs):
            for name, model in models.items():
                with timer.time(times[name]):
                    model(x)
        for name, ms in times.items():
            q = statistics.quantiles(ms, n=10) if len(ms) > 1 else [ms[0]] * 9
            out[f"{name}_ms_b{batch}"] = statistics.median(ms)
            out[f"{name}_p10_p90_ms_b{batch}"] = [q[0], q[-1]]
        out[f"speedup_b{batch}"] = out[f"dense_ms_b{batch}"] / out[f"pruned_ms_b{batch}"]
        out[f"pruned_images_per_s_b{batch}"] = batch / out[f"pruned_ms_b{batch}"] * 1000
    return out


def hardware(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The device(s) of every rank (name, CUDA and cuDNN versions), gathered on all ranks."""
    mine = device_info(device, dtype)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        mine.update(capability=f"{props.major}.{props.minor}", memory_gb=round(props.total_memory / 2**30, 1))
    ranks = [mine]
    if distributed.world_size() > 1:
        ranks = [None] * distributed.world_size()
        torch.distributed.all_gather_object(ranks, mine)
    return {"ranks": ranks, "world_size": distributed.world_size(), "dtype": str(dtype).replace("torch.", "")}


def markdown(data: dict[str, Any]) -> str:
    hw, env, r = data["hardware"], data["environment"], data["results"]
    names = sorted({f"{d.get('name')}" for d in hw["ranks"]})
    first = hw["ranks"][0]
    title = "CPU dry run (tiny model; not a GPU result)" if data["dry_run"] else "GPU check"
    lines = [f"# {title}: {data['shape']} pruned to {TARGET:g} of its FLOPs", "",
             "Random weights, random images pseudo-labelled by the dense model: agreement is the share of "
             "held-out random images on which the pruned model's top-1 class is the dense model's, not an "
             "accuracy. Latency: dense and pruned alternated run by run after warm-up "
             + ("(CUDA events, synchronised)." if first["device"].startswith("cuda") else "(wall clock)."), "",
             f"- device: {', '.join(names)} x {hw['world_size']} rank(s); CUDA {first.get('cuda', '-')}, "
             f"cuDNN {first.get('cudnn', '-')}; timing dtype {hw['dtype']}; torch {env['torch']}",
             f"- command: `{env['command']}`",
             f"- pruning: Fisher saliency, {r['calib_images']} calibration images, {r['prune_steps']} steps, "
             f"{r['prune_seconds']:.1f} s; FLOPs kept {r['kept_flops']:.3f}, params "
             f"{r['params_pruned'] / 1e6:.2f} M of {r['params_dense'] / 1e6:.2f} M",
             f"- distillation: {r['kd_steps']} steps, global batch {r['kd_global_batch']}, loss "
             f"{r['kd_loss_first']:.4f} -> {r['kd_loss_last']:.4f}, {r['kd_images_per_s']:.0f} images/s"
             + (f", peak {r['kd_peak_memory_gb']:.2f} GiB allocated on rank 0" if "kd_peak_memory_gb" in r else ""),
             f"- agreement with the dense model on {r['eval_images']} images: {r['agreement_before_kd']:.3f} "
             f"before distillation, {r['agreement_after_kd']:.3f} after", "",
             "| batch | dense ms (p10-p90) | pruned ms (p10-p90) | speed-up | pruned images/s |",
             "|---|---|---|---|---|"]
    for b in data["settings"]["batch"]:
        d, p = r[f"dense_p10_p90_ms_b{b}"], r[f"pruned_p10_p90_ms_b{b}"]
        lines.append(f"| {b} | {r[f'dense_ms_b{b}']:.2f} ({d[0]:.2f}-{d[1]:.2f}) | {r[f'pruned_ms_b{b}']:.2f} "
                     f"({p[0]:.2f}-{p[1]:.2f}) | {r[f'speedup_b{b}']:.2f}x | {r[f'pruned_images_per_s_b{b}']:.0f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run the same pipeline on the CPU on a tiny model (image 32, 4 blocks, width 64)")
    parser.add_argument("--out-dir", type=Path, default=common.RESULTS, help="where the results are written")
    parser.add_argument("--calib", type=int, default=64, help="calibration images for the saliency")
    parser.add_argument("--calib-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="pruning steps (re-scored between them)")
    parser.add_argument("--kd-steps", type=int, default=300, help="distillation steps")
    parser.add_argument("--kd-batch", type=int, default=64, help="distillation images per step and rank")
    parser.add_argument("--lr", type=float, default=2e-4, help="distillation learning rate")
    parser.add_argument("--eval-images", type=int, default=512, help="held-out random images for agreement")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64], help="latency batch sizes")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per model and batch size")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs per model and batch size first")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="distillation autocast and timing dtype; auto: bf16 where the GPU has it, else fp16")
    args = parser.parse_args(argv)
    if args.cpu_dry_run:
        given = {a.lstrip("-").split("=")[0].replace("-", "_") for a in (argv if argv is not None else sys.argv[1:])}
        for key, value in DRY_RUN.items():
            if key not in given:
                setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print(NO_CUDA.format(torch=torch.__version__, cuda=torch.version.cuda or "no"))
        return 0
    device = distributed.init_from_env("cpu" if args.cpu_dry_run else "cuda")
    if args.dtype == "auto":
        args.dtype = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp16"
    dtype = DTYPES[args.dtype]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    shape = "tiny" if args.cpu_dry_run else "deit-s"
    dense = build(shape)
    if "device" not in inspect.signature(vitrim.prune).parameters:
        raise SystemExit("gpu_check: this vitrim's prune() takes no device=; install vitrim from this checkout "
                         "(pip install -e .)")
    pruned, results = prune_on_device(dense, args, device)
    dense.to(device)
    if distributed.world_size() > 1:  # the ranks' plans agree by construction; rank 0's weights, to be sure
        pruned = share_model(pruned if distributed.is_main() else None).to(device)
    eval_images = random_images(dense.config, args.eval_images, torch.Generator().manual_seed(7), device)
    if distributed.is_main():
        results["agreement_before_kd"] = agreement(pruned, dense, eval_images, args.calib_batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    results.update(distil(pruned, dense, args, device, dtype))
    if device.type == "cuda":
        results["kd_peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    hw = hardware(device, dtype)
    if distributed.is_main():
        results["agreement_after_kd"] = agreement(pruned, dense, eval_images, args.calib_batch)
        results["eval_images"] = args.eval_images
        dense_cost, pruned_cost = model_cost(dense.config), model_cost(pruned.config)
        results.update(kept_flops=pruned_cost.flops / dense_cost.flops, flops_dense=dense_cost.flops,
                       flops_pruned=pruned_cost.flops, params_dense=dense_cost.params,
                       params_pruned=pruned_cost.params, blocks=pruned.config.to_dict()["blocks"])
        results.update(paired_timing(dense, pruned, args, device, dtype))
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        data = {"dry_run": args.cpu_dry_run, "shape": shape, "hardware": hw, "environment": common.environment(),
                "settings": settings, "results": results}
        common.RESULTS = Path(args.out_dir)  # write_results writes into common.RESULTS
        common.write_results("gpu_check_cpu_dry_run" if args.cpu_dry_run else "gpu_check", data, markdown(data))
    distributed.leave()
    return 0


if __name__ == "__main__":
    sys.exit(main())
