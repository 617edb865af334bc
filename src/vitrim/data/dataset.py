"""Labelled image sets held as tensors, batched with augmentation written in torch."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitrim.errors import DataError


@dataclass
class ImageSet:
    """Images ``(N, C, H, W)`` as uint8 (0..255) or float (0..1) and integer labels ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = "images"

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise DataError(f"{self.name}: images must be (N, C, H, W), got {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"{self.name}: {self.images.shape[0]} images but labels of shape "
                            f"{tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def subset(self, count: int) -> "ImageSet":
        """The first ``count`` images (a fixed, repeatable subset)."""
        if count < 1:
            raise DataError(f"a subset needs at least 1 image, asked for {count}")
        if count > len(self):
            raise DataError(f"{self.name} has {len(self)} images, asked for {count}")
        return ImageSet(self.images[:count], self.labels[:count], self.class_names, self.mean,
                        self.std, self.name)

    def batches(
        self,
        batch_size: int,
        *,
        image_size: int | None = None,
        shuffle: bool = False,
        augment: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalised float batches ``(B, C, S, S)`` and labels ``(B,)``."""
        if batch_size < 1:
            raise DataError(f"batch size must be positive, got {batch_size}")
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        stop = len(self) - (len(self) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            index = order[start : start + batch_size]
            x = to_float(self.images[index])
            if augment:
                x = random_crop_flip(x, generator)
            yield self.prepare(x, image_size), self.labels[index]

    def prepare(self, x: torch.Tensor, image_size: int | None = None) -> torch.Tensor:
        if image_size is not None and x.shape[-1] != image_size:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return normalize(x, self.mean, self.std)


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def random_crop_flip(x: torch.Tensor, generator: torch.Generator | None, pad: int = 2) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (zero fill) and horizontal flip, per image."""
    B, _, H, W = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
    rows = (dy.view(B, 1) + torch.arange(H).view(1, H))  # (B, H)
    cols = (dx.view(B, 1) + torch.arange(W).view(1, W))  # (B, W)
    batch = torch.arange(B).view(B, 1, 1)
    out = padded.permute(0, 2, 3, 1)[batch, rows.view(B, H, 1), cols.view(B, 1, W)]  # (B, H, W, C)
    out = out.permute(0, 3, 1, 2)
    flip = torch.rand(B, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out.contiguous()
