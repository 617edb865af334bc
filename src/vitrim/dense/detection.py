"""Anchor-free detection (CenterNet): targets, loss, decoding and COCO mAP.

The head (:class:`vitrim.models.dense.DetectionHead`) predicts, on a grid of ``stride``-pixel
cells, one centre heatmap per class and, per cell, the box width/height and the centre's
sub-cell offset (in cells). Training targets put a Gaussian peak at every object's centre
(CenterNet's radius for IoU 0.7); the loss is the penalty-reduced focal loss on the heatmap plus
L1 on size (x 0.1) and offset at the centres. Decoding keeps the local maxima of the heatmap
(3x3 max-pool) as detections. :func:`coco_map` scores them with ``pycocotools``' COCOeval.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitrim.errors import ConfigError, DataError


def gaussian_radius(height: float, width: float, min_overlap: float = 0.7) -> float:
    """CenterNet's radius: the largest centre shift keeping IoU >= ``min_overlap`` with the true box."""
    a1, b1 = 1, height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1 ** 2 - 4 * a1 * c1)) / 2
    a2, b2, c2 = 4, 2 * (height + width), (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(b2 ** 2 - 4 * a2 * c2)) / 2
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * (height + width), (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def detection_targets(targets: list[dict[str, torch.Tensor]], num_classes: int, grid: tuple[int, int],
                      stride: float) -> dict[str, torch.Tensor]:
    """Heatmaps (B, K, h, w), and per object its cell index, size and offset (with a batch index).

    ``targets``: per image ``boxes`` (n, 4) xyxy in pixels and ``labels`` (n,)."""
    h, w = grid
    heat = torch.zeros(len(targets), num_classes, h, w)
    ys, xs = torch.arange(h, dtype=torch.float32)[:, None], torch.arange(w, dtype=torch.float32)[None, :]
    rows, sizes, offsets = [], [], []
    for b, target in enumerate(targets):
        for box, label in zip(target["boxes"].float() / stride, target["labels"]):
            bw, bh = float(box[2] - box[0]), float(box[3] - box[1])
            cx, cy = float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2
            ix, iy = min(int(cx), w - 1), min(int(cy), h - 1)
            sigma = (2 * max(0, int(gaussian_radius(bh, bw))) + 1) / 6  # CenterNet: diameter / 6
            peak = torch.exp(-((xs - ix) ** 2 + (ys - iy) ** 2) / (2 * sigma ** 2))
            heat[b, int(label)] = torch.maximum(heat[b, int(label)], peak)
            rows.append((b, iy, ix))
            sizes.append((bw, bh))
            offsets.append((cx - ix, cy - iy))
    index = torch.tensor(rows, dtype=torch.long).reshape(-1, 3)
    return {"heatmap": heat, "index": index, "size": torch.tensor(sizes).reshape(-1, 2),
            "offset": torch.tensor(offsets).reshape(-1, 2)}


def detection_loss(output: torch.Tensor, targets: list[dict[str, torch.Tensor]], stride: float) -> torch.Tensor:
    """CenterNet's loss for head output (B, K + 4, h, w) against per-image boxes and labels."""
    K = output.shape[1] - 4
    made = detection_targets(targets, K, output.shape[-2:], stride)
    heat_target = made["heatmap"].to(output.device)
    p = output[:, :K].sigmoid().clamp(1e-4, 1 - 1e-4)
    positive = heat_target.eq(1).float()
    focal = -(positive * (1 - p) ** 2 * p.log()
              + (1 - positive) * (1 - heat_target) ** 4 * p ** 2 * (1 - p).log()).sum()
    count = max(int(positive.sum()), 1)
    loss = focal / count
    index = made["index"].to(output.device)
    if len(index):
        box = output[index[:, 0], K:, index[:, 1], index[:, 2]]  # (n, 4)
        loss = loss + 0.1 * F.l1_loss(box[:, :2], made["size"].to(output.device), reduction="sum") / count
        loss = loss + F.l1_loss(box[:, 2:], made["offset"].to(output.device), reduction="sum") / count
    return loss


@torch.no_grad()
def decode(output: torch.Tensor, stride: float, top_k: int = 100, threshold: float = 0.05
           ) -> list[dict[str, torch.Tensor]]:
    """Per image ``boxes`` (n, 4) xyxy pixels, ``scores`` (n,), ``labels`` (n,): the heatmap's local
    maxima above ``threshold``, at most ``top_k``."""
    B, channels, h, w = output.shape
    K = channels - 4
    heat = output[:, :K].sigmoid()
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    scores, flat = peaks.reshape(B, -1).topk(min(top_k, K * h * w), dim=1)
    labels, cell = flat // (h * w), flat % (h * w)
    iy, ix = cell // w, cell % w
    results = []
    for b in range(B):
        keep = scores[b] > threshold
        y, x = iy[b][keep], ix[b][keep]
        box = output[b, K:, y, x].T  # (n, 4): width, height, dx, dy
        cx, cy = x + box[:, 2], y + box[:, 3]
        half_w, half_h = box[:, 0].clamp_min(0) / 2, box[:, 1].clamp_min(0) / 2
        boxes = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=1) * stride
        results.append({"boxes": boxes, "scores": scores[b][keep], "labels": labels[b][keep]})
    return results


def _coco_ground_truth(data: Any) -> dict[str, Any]:
    images, annotations = [], []
    size = int(data.images.shape[-1])
    for i, target in enumerate(data.targets):
        images.append({"id": i + 1, "width": size, "height": size})
        for box, label, mask in zip(target["boxes"], target["labels"], target["masks"]):
            x0, y0, x1, y1 = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(label) + 1,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(mask.sum()), "iscrowd": 0})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": k + 1, "name": n} for k, n in enumerate(data.class_names)]}


def coco_map(detections: list[dict[str, torch.Tensor]], data: Any) -> dict[str, float]:
    """COCO mAP@[.5:.95], AP50, AP75 and AP by object size of ``detections`` (one per image of the
    :class:`~vitrim.data.coco.DenseSet` ``data``, pixels of its resized images), by pycocotools."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise ConfigError("COCO metrics need pycocotools: pip install 'vitrim[dense]'") from None
    import contextlib
    import io

    if len(detections) != len(data):
        raise DataError(f"{len(detections)} detection lists for {len(data)} images of {data.name}")
    truth = COCO()
    truth.dataset = _coco_ground_truth(data)
    results = [{"image_id": i + 1, "category_id": int(label) + 1, "score": float(score),
                "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]}
               for i, d in enumerate(detections) for b, score, label in zip(d["boxes"], d["scores"], d["labels"])]
    keys = ("map", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")
    if not results:
        return dict.fromkeys(keys, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {key: max(0.0, float(v)) for key, v in zip(keys, evaluation.stats[:6])}


@torch.no_grad()
def evaluate_detection(model: nn.Module, data: Any, batch_size: int = 32) -> dict[str, float]:
    """COCO metrics of a detection :class:`~vitrim.models.dense.DenseModel` on a ``DenseSet``; under
    ``torchrun`` each rank detects on its shard and every rank scores all the detections."""
    was = model.training
    model.eval()
    try:
        return evaluate_detector(lambda images: decode(model(images), model.stride), data, batch_size)
    finally:
        model.train(was)


@torch.no_grad()
def evaluate_detector(detect: Callable[[torch.Tensor], list[dict[str, torch.Tensor]]], data: Any,
                      batch_size: int = 32) -> dict[str, float]:
    """COCO metrics of ``detect`` (normalised images (B, C, S, S) -> per image ``boxes`` xyxy in
    pixels, ``scores``, ``labels``) on a ``DenseSet``; under ``torchrun`` each rank detects on its
    shard and every rank scores all the detections."""
    from vitrim import distributed
    from vitrim.dense.segmentation import normalised_batches

    detections: list[dict[str, torch.Tensor]] = []
    for _, images in normalised_batches(data.shard(), batch_size):
        detections += [{k: v.cpu() for k, v in d.items()} for d in detect(images)]
    gathered = distributed.all_gather_object(detections)  # the shards in rank order: the images' order
    return coco_map([d for part in gathered for d in part], data)
