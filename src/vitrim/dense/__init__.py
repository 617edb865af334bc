"""Dense prediction around a ViT backbone: losses, decoding, metrics and evaluation."""

from vitrim.dense.detection import coco_map, decode, detection_loss, detection_targets, evaluate_detection
from vitrim.dense.segmentation import SegmentationScore, confusion, evaluate_segmentation, segmentation_loss

__all__ = ["SegmentationScore", "coco_map", "confusion", "decode", "detection_loss", "detection_targets",
           "evaluate_detection", "evaluate_segmentation", "segmentation_loss"]
