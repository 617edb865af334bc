"""Fashion-MNIST and any MNIST-format directory of IDX files."""

from __future__ import annotations

import os
import tempfile
import urllib.request
from pathlib import Path

import torch

from vitrim.data.dataset import ImageSet
from vitrim.data.idx import find_idx_file, parse_idx, read_idx, read_idx_bytes
from vitrim.errors import DataError

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
SOURCE_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
# sha256 of the decompressed IDX files.
FASHION_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
SPLIT_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

HOW_TO_GET = (
    "install Debian's package with `sudo apt-get install dataset-fashion-mnist` (files land in "
    f"{SYSTEM_DIR}), or put the four IDX files in a directory and pass --data-dir DIR, or allow "
    "network access so vitrim can download them to its cache"
)


def cache_dir() -> Path:
    root = os.environ.get("VITRIM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vitrim")
    return Path(root) / "fashion-mnist"


def check_split(split: str) -> None:
    if split not in SPLIT_STEMS:
        raise DataError(f"unknown split {split!r}; use 'train' or 'test'")


def load_idx_dir(directory: Path, split: str, *, name: str, class_names: list[str] | None = None,
                 mean: tuple[float, ...] = (0.5,), std: tuple[float, ...] = (0.5,),
                 checksums: dict[str, str] | None = None) -> ImageSet:
    """Load one split of an MNIST-format directory (the four standard IDX file names)."""
    check_split(split)
    if not directory.is_dir():
        raise DataError(f"data directory {directory} does not exist")
    tensors = []
    for stem in SPLIT_STEMS[split]:
        path = find_idx_file(directory, stem)
        if path is None:
            raise DataError(f"{directory} has no {stem}[.gz]; an MNIST-format directory needs "
                            f"{', '.join(s for pair in SPLIT_STEMS.values() for s in pair)}")
        tensors.append(read_idx(path, (checksums or {}).get(stem)))
    images, labels = tensors
    check_idx_split(directory, split, images, labels)
    labels = labels.long()
    if class_names is not None and int(labels.max()) >= len(class_names):
        raise DataError(f"{directory}: {split} labels go up to {int(labels.max())} but the data set has "
                        f"{len(class_names)} classes; the label file belongs to another data set, obtain a "
                        f"fresh copy")
    names = class_names or [str(i) for i in range(int(labels.max()) + 1)]
    return ImageSet(images.unsqueeze(1), labels, names, mean, std, name=f"{name}/{split}",
                    inferred_classes=class_names is None)


def check_idx_split(directory: Path, split: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    """A :class:`DataError` unless ``images`` (N, H, W) uint8 and ``labels`` (N,) integers make a split."""
    files = f"{directory}/{SPLIT_STEMS[split][0]} and {SPLIT_STEMS[split][1]}"
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(f"{directory}: images {tuple(images.shape)} and labels "
                        f"{tuple(labels.shape)} do not match; {files} must hold N images (N, H, W) and N labels")
    if images.shape[0] == 0:
        raise DataError(f"{directory}: the {split} split holds zero images; {files} need at least one image")
    if images.shape[1] != images.shape[2] or images.shape[1] == 0:
        raise DataError(f"{directory}: {split} images are {images.shape[1]}x{images.shape[2]}; vitrim needs "
                        f"square images of at least 1x1 (crop or pad them)")
    if images.dtype != torch.uint8:
        raise DataError(f"{directory}: {split} images are stored as {images.dtype}; MNIST-format images are "
                        f"unsigned bytes (IDX type 0x08)")
    if labels.is_floating_point():
        raise DataError(f"{directory}: {split} labels are stored as {labels.dtype}; labels are integer class "
                        f"indices (IDX type 0x08)")
    if int(labels.min()) < 0:
        raise DataError(f"{directory}: {split} has label {int(labels.min())}; labels are class indices 0, 1, 2, ...")
    from vitrim.limits import MAX_WIDTH

    if int(labels.max()) >= MAX_WIDTH:
        raise DataError(f"{directory}: {split} has label {int(labels.max())}, beyond any model vitrim runs "
                        f"(at most {MAX_WIDTH} classes); the label file is corrupt, obtain a fresh copy")


def download(directory: Path) -> None:
    """Fetch the four files from the official source, verify them, write atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    for stem, digest in FASHION_SHA256.items():
        target = directory / (stem + ".gz")
        if target.is_file():
            continue
        with urllib.request.urlopen(SOURCE_URL + stem + ".gz", timeout=30) as response:
            payload = response.read()
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".part")
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
        import hashlib
        if hashlib.sha256(read_idx_bytes(Path(tmp))).hexdigest() != digest:
            os.unlink(tmp)
            raise DataError(f"downloaded {stem} has the wrong checksum")
        os.replace(tmp, target)


def locate_fashion_mnist(data_dir: str | Path | None = None, allow_download: bool = True) -> Path:
    """The first directory holding Fashion-MNIST: ``data_dir``, the system dir, the cache."""
    if data_dir is not None:
        return Path(data_dir)
    for candidate in (SYSTEM_DIR, cache_dir()):
        if candidate.is_dir() and find_idx_file(candidate, "t10k-labels-idx1-ubyte"):
            return candidate
    if allow_download and os.environ.get("VITRIM_OFFLINE") != "1":
        try:
            download(cache_dir())
            return cache_dir()
        except (OSError, DataError):
            pass
    raise DataError(f"Fashion-MNIST not found; {HOW_TO_GET}")


_CACHE: dict[tuple[str, str], ImageSet] = {}


def load_fashion_mnist(split: str = "train", data_dir: str | Path | None = None) -> ImageSet:
    check_split(split)
    directory = locate_fashion_mnist(data_dir)
    key = (str(directory.resolve()), split)
    if key not in _CACHE:
        _CACHE[key] = load_idx_dir(directory, split, name="fashion-mnist",
                                   class_names=FASHION_CLASSES, mean=FASHION_MEAN,
                                   std=FASHION_STD, checksums=FASHION_SHA256)
    return _CACHE[key]


def idx_payload(images: torch.Tensor) -> bytes:
    """IDX bytes for a uint8 tensor (used to write small MNIST-format directories)."""
    header = bytes([0, 0, 0x08, images.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in images.shape)
    return header + images.to(torch.uint8).contiguous().numpy().tobytes()


__all__ = ["load_fashion_mnist", "load_idx_dir", "locate_fashion_mnist", "parse_idx", "idx_payload"]
