"""A ViT as the backbone of a dense predictor: a ViTDet-style simple feature pyramid from the
backbone's feature maps, and a semantic-segmentation head or an anchor-free (CenterNet-style)
detection head.

The backbone is any canonical :class:`~vitrim.models.VisionTransformer` (a Hugging Face or timm
ViT converts to one exactly) or a token-reduced view of it, whose feature maps are the restored
full grid (merge, then unmerge), so the head always sees the grid it was built for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitrim.errors import ConfigError
from vitrim.models.vit import VisionTransformer

TASKS = ("segment", "detect")


@dataclass(frozen=True)
class DenseHeadConfig:
    """``num_classes``: per-pixel classes (segment: background included) or object classes
    (detect); ``index``: the block whose feature map feeds the pyramid (ViTDet: the last);
    ``scales``: pyramid levels relative to the patch grid (2 = twice as fine; detection predicts
    on the finest and computes only that one); ``width``: channels of every level and of the head."""

    num_classes: int
    task: str = "segment"
    index: int = -1
    scales: tuple[float, ...] = (2.0, 1.0, 0.5)
    width: int = 64

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"unknown dense task {self.task!r}; use one of {', '.join(TASKS)}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ConfigError(f"num_classes must be a positive integer, got {self.num_classes!r}")
        if not self.scales or any(s not in (4.0, 2.0, 1.0, 0.5) for s in self.scales):
            raise ConfigError(f"pyramid scales must be among 4, 2, 1, 0.5, got {self.scales}")
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1:
            raise ConfigError(f"width must be a positive integer, got {self.width!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "scales": list(self.scales)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DenseHeadConfig":
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown dense head keys: {', '.join(unknown)}")
        return cls(**{**data, "scales": tuple(float(s) for s in data.get("scales", cls.scales))})


def _level(in_channels: int, width: int, scale: float) -> nn.Sequential:
    """One pyramid level from the (B, C, G, G) map: resample by ``scale``, then 1x1 and 3x3 convs."""
    layers: list[nn.Module] = []
    channels = in_channels
    steps = {4.0: 2, 2.0: 1}.get(scale, 0)
    for step in range(steps):
        out = channels // 2 if step < steps - 1 else channels
        layers += [nn.ConvTranspose2d(channels, out, 2, stride=2)] + ([nn.GELU()] if step < steps - 1 else [])
        channels = out
    if scale == 0.5:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.Conv2d(channels, width, 1), nn.GroupNorm(1, width), nn.Conv2d(width, width, 3, padding=1),
               nn.GroupNorm(1, width)]
    return nn.Sequential(*layers)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: every level from the one last feature map, no top-down path."""

    def __init__(self, in_channels: int, config: DenseHeadConfig) -> None:
        super().__init__()
        self.levels = nn.ModuleList(_level(in_channels, config.width, s) for s in config.scales)

    def forward(self, features: torch.Tensor, levels: list[int] | None = None) -> list[torch.Tensor]:
        """(B, C, G, G) -> [(B, W, sG, sG)] per level (``levels``: these indices only)."""
        chosen = range(len(self.levels)) if levels is None else levels
        return [self.levels[i](features) for i in chosen]


class SegmentationHead(nn.Module):
    """Every pyramid level upsampled to the finest and summed, a 3x3 conv, per-pixel logits."""

    def __init__(self, config: DenseHeadConfig) -> None:
        super().__init__()
        self.fuse = nn.Sequential(nn.Conv2d(config.width, config.width, 3, padding=1), nn.GroupNorm(1, config.width),
                                  nn.GELU())
        self.classifier = nn.Conv2d(config.width, config.num_classes, 1)

    def forward(self, levels: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:  # -> (B, K, H, W)
        finest = max(levels, key=lambda t: t.shape[-1])
        fused = sum(F.interpolate(t, size=finest.shape[-2:], mode="bilinear", align_corners=False)
                    if t.shape[-1] != finest.shape[-1] else t for t in levels)
        logits = self.classifier(self.fuse(fused))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class DetectionHead(nn.Module):
    """CenterNet-style, on the finest pyramid level: per class a centre heatmap (logits), per cell
    the box size and the centre's sub-cell offset, both in cells. Output (B, K + 4, h, w)."""

    def __init__(self, config: DenseHeadConfig) -> None:
        super().__init__()
        W = config.width
        self.shared = nn.Sequential(nn.Conv2d(W, W, 3, padding=1), nn.GroupNorm(1, W), nn.GELU())
        self.heatmap = nn.Conv2d(W, config.num_classes, 1)
        self.box = nn.Conv2d(W, 4, 1)  # (width, height, dx, dy)
        nn.init.constant_(self.heatmap.bias, -2.19)  # sigmoid = 0.1: CenterNet's prior

    def forward(self, levels: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        finest = max(levels, key=lambda t: t.shape[-1])
        hidden = self.shared(finest)
        return torch.cat([self.heatmap(hidden), self.box(hidden)], dim=1)


HEADS = {"segment": SegmentationHead, "detect": DetectionHead}


class DenseModel(nn.Module):
    """A canonical ViT backbone, a simple feature pyramid and the task's head. ``segment``: images
    (B, in, H, W) -> per-pixel logits (B, K, H, W); ``detect``: -> (B, K + 4, h, w) raw head maps
    (decode boxes with :func:`vitrim.dense.detection.decode`). The backbone can run through a
    token-reduced view of itself (:meth:`use_reduced`)."""

    def __init__(self, backbone: VisionTransformer, config: DenseHeadConfig) -> None:
        super().__init__()
        if not isinstance(backbone, VisionTransformer):
            raise ConfigError(f"a dense model's backbone is a vitrim ViT (convert others with "
                              f"vitrim.adapters.to_canonical), got {type(backbone).__name__}")
        backbone.block_indices([config.index])  # a ConfigError for a block the backbone lacks
        self.backbone, self.dense = backbone, config
        self.use_reduced(None)
        self.pyramid = SimpleFeaturePyramid(backbone.config.embed_dim, config)
        self.head = HEADS[config.task](config)

    @property
    def config(self):
        """The backbone's :class:`~vitrim.models.ViTConfig` (input size, FLOPs, pruning)."""
        return self.backbone.config

    @property
    def stride(self) -> float:
        """Input pixels per cell of the detection head's output."""
        return self.config.patch_size / max(self.dense.scales)

    def use_reduced(self, view: nn.Module | None) -> "DenseModel":
        """Run the backbone through ``view``, a token-reduced view of it (``vitrim.reduce_tokens(
        model.backbone, ...)``; its knobs stay settable), or through itself again (None)."""
        if view is not None and getattr(view, "model", None) is not self.backbone:
            raise ConfigError("the token-reduced view must wrap this dense model's own backbone: "
                              "vitrim.reduce_tokens(model.backbone, ...)")
        object.__setattr__(self, "reduced", view)  # not a sub-module: its weights are the backbone's
        return self

    def through(self, view: nn.Module) -> "DenseModel":
        """A second dense model holding this one's backbone, pyramid and head (the same modules and
        weights) whose backbone runs through ``view``, a token-reduced view of it; this model keeps
        running through its backbone."""
        twin = DenseModel.__new__(DenseModel)
        nn.Module.__init__(twin)
        twin.backbone, twin.pyramid, twin.head, twin.dense = self.backbone, self.pyramid, self.head, self.dense
        twin.training = self.training
        return twin.use_reduced(view)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:  # (B, in, H, W) -> (B, C, G, G)
        source = self.reduced if self.reduced is not None else self.backbone
        return source.forward_intermediates(images, [self.dense.index])[0]

    def predict(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The head's output from the backbone's feature map (B, C, G, G), for ``size`` input images;
        the detector computes only the pyramid level its head reads (the finest)."""
        levels = None
        if self.dense.task == "detect":
            levels = [max(range(len(self.dense.scales)), key=lambda i: self.dense.scales[i])]
        return self.head(self.pyramid(features, levels), size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.predict(self.feature_map(images), images.shape[-2:])
