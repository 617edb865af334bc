"""Dense prediction around a ViT backbone: segmentation metrics, losses and evaluation."""

from vitrim.dense.segmentation import SegmentationScore, confusion, evaluate_segmentation, segmentation_loss

__all__ = ["SegmentationScore", "confusion", "evaluate_segmentation", "segmentation_loss"]
