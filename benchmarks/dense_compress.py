"""The stacked pipeline on the reference detector and segmenter (``vitrim compress DENSE``): the
backbone pruned by the task loss with reconstruction (no training), ToMe merging restored to the
full grid for the head, ONNX export and int8 through ONNX Runtime. Every stage is scored on the
val split (COCO mAP, mIoU) and all stages of one model are timed interleaved in one process, at
batch 1 and 8, against the dense PyTorch model.

    .venv/bin/python benchmarks/dense_compress.py --detector runs/detector --segmenter runs/segmenter \\
        --data data/coco48 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results  # noqa: E402

import vitrim  # noqa: E402
from vitrim.compress import CompressConfig, stage_table  # noqa: E402
from vitrim.data.coco import find_split, load_coco  # noqa: E402
from vitrim.dense.compress import compress_dense  # noqa: E402


def splits(root: Path, model: Any) -> tuple[Any, Any]:
    cfg = model.config
    return tuple(load_coco(root, find_split(root, kind, None), cfg.image_size, cfg.in_chans).for_model(cfg)
                 for kind in ("train", "val"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", type=Path, required=True)
    parser.add_argument("--segmenter", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="the COCO-format set both were trained on")
    parser.add_argument("--prune", default="flops=0.6")
    parser.add_argument("--tokens", default="keep=0.7")
    parser.add_argument("--quant", default="w8a8")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="dense_compress")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = CompressConfig(prune=args.prune, tokens=args.tokens, quant=args.quant, threads=args.threads, runs=args.runs)
    reports: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="vitrim-dense-compress-") as tmp:
        for kind, path in (("detector", args.detector), ("segmenter", args.segmenter)):
            model = vitrim.load(path)
            train, val = splits(args.data, model)
            reports[kind] = compress_dense(model, train, val, cfg, Path(tmp) / kind, progress=False, log=print)
    md = [f"# `vitrim compress` on dense models: {args.prune}, tokens {args.tokens}, {args.quant}", "",
          f"Command: `{environment()['command']}`. Val split of {args.data.name}; whole models timed interleaved, "
          f"{args.threads} threads, median of {args.runs}; `*` marks a timing flagged unstable.", ""]
    for kind, report in reports.items():
        md += [f"## {kind} ({report['val_images']} val images)", "", "```", stage_table(report), "```", ""]
    write_results(args.name, {"environment": environment(), "config": vars(args) | {"detector": str(args.detector),
                                                                                  "segmenter": str(args.segmenter),
                                                                                  "data": str(args.data)},
                              "reports": reports}, "\n".join(md))


if __name__ == "__main__":
    main()
