"""Image-folder datasets decoded with PIL, resized in torch: one sub-folder per class (labelled),
or a flat folder of images (unlabelled, for label-free pruning)."""

from __future__ import annotations

import os
import warnings
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


def decode_image(path: Path, mode: str) -> np.ndarray:
    """The image at ``path`` as a uint8 array in PIL ``mode``; a :class:`DataError` naming the file if it
    cannot be decoded or its header claims more pixels than PIL's decompression-bomb limit."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return np.asarray(img.convert(mode), dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"image {path} claims a size beyond the safe limit of {Image.MAX_IMAGE_PIXELS} pixels "
                        f"({exc}); it is corrupt or a decompression bomb; resize it or remove it from the "
                        f"folder") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise DataError(f"cannot decode image {path}: {exc}; replace or remove the file") from None


def load_resized(path: Path, mode: str, size: int) -> torch.Tensor:
    """The image at ``path`` as floats in 0..1 ``(C, size, size)``: decoded in PIL ``mode``, short side
    resized to ``size``, centre cropped (a :class:`DataError` naming the file if it cannot be decoded)."""
    image = torch.from_numpy(decode_image(path, mode).copy()).float().div_(255.0)
    image = image[None] if image.ndim == 2 else image.permute(2, 0, 1)  # (C, H, W)
    return resize_center_crop(image, size)


def _check_folder_memory(root: Path, count: int, channels: int, image_size: int) -> None:
    """Refuse a folder whose decoded images (float32 at ``image_size``) would not fit in RAM."""
    from vitrim.limits import FLOAT_BYTES, human_bytes, physical_ram

    need, ram = count * channels * image_size**2 * FLOAT_BYTES, physical_ram()
    if need > ram:
        raise DataError(f"{root}: {count} images at {image_size}x{image_size} need {human_bytes(need)}, more "
                        f"than this machine's {human_bytes(ram)} of RAM; use a smaller folder")


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (by suffix; other files such as ``labels.txt`` are
    skipped), sorted by name."""
    with os.scandir(folder) as entries:  # d_type, no stat per file: ImageNet's train split is 1.28 M files
        names = sorted(e.name for e in entries if e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES)
    return [folder / name for name in names]


def default_stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation ``(mean, std)`` for a folder when none is given: ImageNet's for 3 channels, 0.5 else."""
    return (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,))


def folder_fits_in_ram(root: Path, image_size: int, channels: int, share: float = 0.25) -> bool:
    """Whether the images directly under ``root`` or its sub-folders, decoded as float32 at
    ``image_size`` (twice: decoded, then stacked), take at most ``share`` of the RAM split between
    the processes of this machine (True for a path that is not a folder, so the in-memory loader
    reports it)."""
    from vitrim.distributed import local_world_size
    from vitrim.limits import FLOAT_BYTES, physical_ram

    if not root.is_dir():
        return True
    with os.scandir(root) as entries:
        subs = [Path(e.path) for e in entries if e.is_dir() and not e.name.startswith(".")]
    count = len(image_files(root)) + sum(len(image_files(sub)) for sub in subs)
    return 2 * count * channels * image_size**2 * FLOAT_BYTES <= share * physical_ram() / local_world_size()


def scan_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """The images under ``root``, their labels (-1 for a flat, unlabelled folder) and the class names."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; pass a directory of class sub-folders or images")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    layouts = (f"use one layout: {root}/<class>/<image>.JPEG (labelled) or {root}/<image>.JPEG with no "
               f"sub-folders (unlabelled, for objective='features')")
    if not classes:
        files = image_files(root)
        if not files:
            raise DataError(f"{root} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}) and no class "
                            f"sub-folders; {layouts}")
        return files, [-1] * len(files), []
    loose = image_files(root)
    if loose:
        raise DataError(f"{root} holds both images ({loose[0].name}, ...) and sub-folders ({classes[0]}/, ...); "
                        f"{layouts}")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = image_files(root / name)
        files += found
        labels += [label] * len(found)
    if not files:
        raise DataError(f"{root} has class folders but no images ({', '.join(sorted(IMAGE_SUFFIXES))}); {layouts}")
    return files, labels, classes


def load_image_folder(root: str | Path, image_size: int, channels: int = 3,
                      mean: tuple[float, ...] | None = None,
                      std: tuple[float, ...] | None = None) -> ImageSet:
    """Decode every image under ``root`` into memory at ``image_size``.

    ``root/<class>/<image>`` gives a labelled set (classes in sorted folder order);
    ``root/<image>`` with no sub-folders an unlabelled one (``labels`` is ``None``). A folder
    holding both images and sub-folders is refused, as it fits neither layout.
    """
    try:
        import PIL.Image  # noqa: F401 - decode_image needs it
    except ImportError:
        raise DataError("image folders need Pillow: pip install pillow") from None
    root = Path(root)
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise DataError(f"image folders support 1 or 3 channels, got {channels}")
    files, labels, classes = scan_folder(root)
    _check_folder_memory(root, len(files), channels, image_size)
    images = [load_resized(path, mode, image_size) for path in files]
    default_mean, default_std = default_stats(channels)
    return ImageSet(torch.stack(images), torch.tensor(labels) if classes else None,  # (N,), or unlabelled
                    classes, mean or default_mean, std or default_std, name=str(root))
