"""An image-folder dataset: one sub-folder per class, decoded with PIL, resized in torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vitrim.data.dataset import ImageSet
from vitrim.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def resize_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the short side to ``size`` (antialiased bilinear), then crop the centre square."""
    _, h, w = image.shape  # (C, H, W), float
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", antialias=True,
                          align_corners=False)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return image[:, top : top + size, left : left + size]


def load_image_folder(root: str | Path, image_size: int, channels: int = 3,
                      mean: tuple[float, ...] | None = None,
                      std: tuple[float, ...] | None = None) -> ImageSet:
    """Decode every image under ``root/<class>/`` into memory at ``image_size``."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError("image folders need Pillow: pip install pillow") from None
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root} has no class sub-folders; expected {root}/<class>/<image>.png")
    images, labels = [], []
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise DataError(f"image folders support 1 or 3 channels, got {channels}")
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as img:
                    array = np.asarray(img.convert(mode), dtype=np.uint8)
            except OSError as exc:
                raise DataError(f"cannot decode image {path}: {exc}") from None
            tensor = torch.from_numpy(array.copy()).float().div_(255.0)
            tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
            images.append(resize_center_crop(tensor, image_size))
            labels.append(label)
    if not images:
        raise DataError(f"{root} has class folders but no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    default_mean, default_std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,))
    return ImageSet(torch.stack(images), torch.tensor(labels), classes, mean or default_mean,
                    std or default_std, name=str(root))
