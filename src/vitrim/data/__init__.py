"""Datasets without torchvision: Fashion-MNIST, MNIST-format IDX directories, image folders."""

from __future__ import annotations

from pathlib import Path

from vitrim.data.dataset import ImageSet
from vitrim.data.fashion_mnist import FASHION_MEAN, FASHION_STD, load_fashion_mnist, load_idx_dir
from vitrim.data.image_folder import folder_fits_in_ram, load_image_folder
from vitrim.errors import DataError

DATASETS = ("fashion-mnist", "idx:DIR", "folder:DIR")


def load_dataset(spec: str, split: str = "test", *, data_dir: str | Path | None = None,
                 image_size: int = 224, channels: int = 3, workers: int | None = None) -> ImageSet:
    """Load a dataset by spec: ``fashion-mnist``, ``idx:DIR`` (MNIST format) or ``folder:DIR``.

    For image folders, ``DIR/<split>`` is used when it exists (``DIR/val`` for the test split
    when there is no ``DIR/test``), else ``DIR`` itself; a folder of
    class sub-folders is labelled, a flat folder of images unlabelled (``labels`` is ``None``, for
    pruning with ``objective="features"``). A folder is decoded into memory when its images fit
    in a quarter of the RAM and ``workers`` is ``None``; otherwise it is read lazily, batch by
    batch, by ``workers`` decoding processes (a :class:`vitrim.data.loader.FolderSet`; ``None``:
    one per core, at most 8).
    """
    if spec == "fashion-mnist":
        return load_fashion_mnist(split, data_dir)
    kind, _, path = spec.partition(":")
    if kind == "idx" and path:
        return load_idx_dir(Path(path), split, name=path)
    if kind == "folder" and path:
        root = Path(path)
        for name in (split, "val") if split == "test" else (split,):  # ImageNet names its test split val
            if (root / name).is_dir():
                root = root / name
                break
        if workers is None and folder_fits_in_ram(root, image_size, channels):
            return load_image_folder(root, image_size, channels)
        from vitrim.data.loader import folder_set

        return folder_set(root, image_size, channels, workers=workers)
    raise DataError(f"unknown dataset {spec!r}; use one of: {', '.join(DATASETS)}")


__all__ = ["ImageSet", "load_dataset", "load_fashion_mnist", "load_idx_dir", "load_image_folder",
           "FASHION_MEAN", "FASHION_STD"]
