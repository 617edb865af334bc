"""Segmentation metrics against hand-computed values, and a segmenter scored on a COCO-format set."""

import pytest
import torch

from vitrim.dense import SegmentationScore, confusion, evaluate_segmentation, segmentation_loss
from vitrim.errors import DataError


def test_miou_and_pixel_accuracy_by_hand():
    truth = torch.tensor([[[0, 0, 1, 1], [0, 2, 2, 2]]])
    predicted = torch.tensor([[[0, 1, 1, 1], [0, 2, 2, 0]]])
    score = SegmentationScore.from_confusion(confusion(predicted, truth, 4))
    # class 0: hits 2, union 4; class 1: hits 2, union 3; class 2: hits 2, union 3; class 3 absent
    assert score.per_class_iou == (0.5, 2 / 3, 2 / 3, None)
    assert score.miou == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3) and score.pixel_accuracy == 6 / 8


def test_a_segmenter_on_a_coco_set(tmp_path):
    pytest.importorskip("pycocotools")
    from vitrim.data.coco import load_coco, write_synthetic_coco
    from tests.conftest import coco_items
    from vitrim.models import VisionTransformer, uniform_config
    from vitrim.models.dense import DenseHeadConfig, DenseModel

    source = coco_items(12, 3)
    data = load_coco(write_synthetic_coco(tmp_path / "set", source, train=2, val=4, canvas=32), "val", image_size=32)
    torch.manual_seed(0)
    backbone = VisionTransformer(uniform_config(2, 32, 2, image_size=32, patch_size=4, in_chans=1, num_classes=4,
                                                mean=(0.5,), std=(0.5,)))
    model = DenseModel(backbone, DenseHeadConfig(num_classes=4))
    score = evaluate_segmentation(model, data)
    assert score.pixels == 4 * 32 * 32 and 0 <= score.miou <= 1
    logits = model(torch.zeros(4, 1, 32, 32))
    assert segmentation_loss(logits, data.semantic).item() > 0
    wrong = DenseModel(backbone, DenseHeadConfig(num_classes=7))
    with pytest.raises(DataError, match="predicts 7 classes per pixel but .* has 4"):
        evaluate_segmentation(wrong, data)
