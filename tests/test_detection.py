"""Anchor-free detection: targets, decoding, the loss and COCO mAP (pycocotools)."""

import math

import pytest
import torch

pytest.importorskip("pycocotools")

from vitrim.data.coco import load_coco, write_synthetic_coco
from tests.conftest import coco_items
from vitrim.dense import coco_map, decode, detection_loss, detection_targets, evaluate_detection
from vitrim.models import VisionTransformer, uniform_config
from vitrim.models.dense import DenseHeadConfig, DenseModel


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    source = coco_items(12, 3)
    root = write_synthetic_coco(tmp_path_factory.mktemp("det") / "set", source, train=2, val=6, canvas=64, seed=2)
    return load_coco(root, "val", image_size=64)


def perfect_output(data, stride: float, K: int) -> torch.Tensor:
    """Head maps that say exactly the ground truth: logit peaks at centres, exact sizes and offsets."""
    grid = (int(64 / stride), int(64 / stride))
    made = detection_targets(data.targets, K, grid, stride)
    heat = made["heatmap"].clamp(1e-6, 1 - 1e-6)
    out = torch.cat([torch.log(heat / (1 - heat)), torch.zeros(len(data), 4, *grid)], dim=1)
    for (b, y, x), size, offset in zip(made["index"], made["size"], made["offset"]):
        out[b, K:K + 2, y, x], out[b, K + 2:, y, x] = size, offset
    return out


def test_decoding_perfect_maps_gives_the_boxes_back_and_map_1(data):
    out = perfect_output(data, 4.0, 3)
    detections = decode(out, 4.0, threshold=0.5)
    for found, truth in zip(detections, data.targets):
        assert len(found["boxes"]) == len(truth["boxes"])
        order = torch.argsort(found["boxes"][:, 0] * 1000 + found["boxes"][:, 1])
        expected = torch.argsort(truth["boxes"][:, 0] * 1000 + truth["boxes"][:, 1])
        torch.testing.assert_close(found["boxes"][order], truth["boxes"][expected], atol=1e-4, rtol=0)
    scores = coco_map(detections, data)
    assert scores["map"] == pytest.approx(1.0) and scores["ap50"] == pytest.approx(1.0)


def test_loss_is_smallest_at_the_truth_and_a_detector_learns(data):
    K = 3
    perfect = detection_loss(perfect_output(data, 4.0, K), data.targets, 4.0)
    noisy = detection_loss(perfect_output(data, 4.0, K) + torch.randn(len(data), K + 4, 16, 16), data.targets, 4.0)
    assert perfect < noisy
    torch.manual_seed(0)
    backbone = VisionTransformer(uniform_config(2, 32, 2, image_size=64, patch_size=8, in_chans=1, num_classes=1,
                                                mean=(0.5,), std=(0.5,)))
    model = DenseModel(backbone, DenseHeadConfig(num_classes=K, task="detect", scales=(2.0, 1.0)))
    assert model.stride == 4.0
    images = (data.images.float() / 255 - 0.5) / 0.5
    optimizer = torch.optim.AdamW(model.parameters(), 3e-3)
    losses = []
    for _ in range(15):
        loss = detection_loss(model(images), data.targets, model.stride)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0] and all(math.isfinite(v) for v in losses)
    scores = evaluate_detection(model, data)
    assert set(scores) == {"map", "ap50", "ap75", "ap_small", "ap_medium", "ap_large"}
    assert 0 <= scores["map"] <= 1
