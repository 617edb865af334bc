"""The lazy image-folder loader: same pixels and labels as load_image_folder, repeatable shuffles,
one clear DataError for bad folders and files, with and without worker processes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitrim.data import load_image_folder
from vitrim.data.loader import ImageFolderDataset, folder_loader, loader_throughput
from vitrim.errors import ConfigError, DataError

PIL = pytest.importorskip("PIL.Image")

SIZE = 24
ROUNDING = 0.5 / 255 / min((0.229, 0.224, 0.225)) + 1e-5  # uint8 rounding, in normalised units


def write_image(path, seed: int, shape=(30, 40), mode: str = "RGB") -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, shape + ((3,) if mode == "RGB" else ()), dtype=np.uint8)
    PIL.fromarray(pixels, mode).save(path)


@pytest.fixture
def imagenet_like(tmp_path):
    """DIR/train/<class>/*.{png,JPEG} (3 classes, mixed sizes and formats) and DIR/val/<class>/*."""
    for split, count in (("train", 4), ("val", 2)):
        for c, name in enumerate(("n01", "n02", "n03")):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                suffix = ".JPEG" if i % 2 else ".png"
                write_image(folder / f"img{i}{suffix}", seed=100 * c + i, shape=(28 + 3 * i, 36 - 2 * i))
    return tmp_path


def collect(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), (torch.cat(ys) if ys[0] is not None else None)


@pytest.mark.parametrize("workers", [0, 2])
def test_same_images_and_labels_as_load_image_folder(imagenet_like, workers):
    reference = load_image_folder(imagenet_like / "train", SIZE)
    ref_x, ref_y = next(reference.batches(len(reference)))
    loader = folder_loader(imagenet_like, SIZE, split="train", batch_size=5, workers=workers)
    x, y = collect(loader)
    assert x.shape == ref_x.shape == (12, 3, SIZE, SIZE) and x.dtype == torch.float32
    assert torch.equal(y, ref_y)
    assert (x - ref_x).abs().max() <= ROUNDING
    assert loader.dataset.class_names == reference.class_names == ["n01", "n02", "n03"]
    val = folder_loader(imagenet_like, SIZE, split="val", batch_size=4, workers=0)
    assert len(val.dataset) == 6


def test_flat_folder_is_unlabelled_and_grayscale_works(tmp_path):
    for i in range(3):
        write_image(tmp_path / f"{i}.png", seed=i, mode="L")
    reference = load_image_folder(tmp_path, SIZE, channels=1)
    x, y = collect(folder_loader(tmp_path, SIZE, batch_size=2, workers=0, channels=1))
    assert y is None and x.shape == (3, 1, SIZE, SIZE)
    assert (x - next(reference.batches(3))[0]).abs().max() <= 0.5 / 255 / 0.5 + 1e-5


def test_shuffle_is_repeatable_across_worker_counts(imagenet_like):
    def order(workers: int, seed: int) -> list[int]:
        loader = folder_loader(imagenet_like, 8, split="train", batch_size=4, workers=workers, shuffle=True,
                               seed=seed)
        return collect(loader)[1].tolist()

    first = order(0, seed=3)
    assert first == order(0, seed=3) == order(2, seed=3)
    assert sorted(first) == [0] * 4 + [1] * 4 + [2] * 4
    assert first != order(0, seed=4) or first != order(0, seed=5)


def test_throughput_counts_images_per_second(imagenet_like):
    rate = loader_throughput(folder_loader(imagenet_like, 8, split="train", batch_size=3, workers=0), 10)
    assert rate > 0


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_is_one_error_naming_the_file(imagenet_like, workers):
    bad = imagenet_like / "train" / "n02" / "img9.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    loader = folder_loader(imagenet_like, SIZE, split="train", batch_size=4, workers=workers)
    with pytest.raises(DataError) as info:
        collect(loader)
    message = str(info.value)
    assert str(bad) in message and "\n" not in message and "replace or remove" in message


def test_non_image_file_is_named(imagenet_like):
    stray = imagenet_like / "train" / "n01" / "labels.txt"
    stray.write_text("n01\n")
    with pytest.raises(DataError, match="labels.txt is not an image"):
        folder_loader(imagenet_like, SIZE, split="train", batch_size=4, workers=0)
    (imagenet_like / "train" / "n01" / ".DS_Store").write_bytes(b"")  # hidden files are skipped
    stray.unlink()
    assert len(ImageFolderDataset(imagenet_like / "train", SIZE)) == 12


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(DataError, match="has no images"):
        folder_loader(tmp_path, SIZE, batch_size=2, workers=0)
    (tmp_path / "cat").mkdir()
    with pytest.raises(DataError, match="class folders but no images"):
        folder_loader(tmp_path, SIZE, batch_size=2, workers=0)
    with pytest.raises(DataError, match="does not exist"):
        folder_loader(tmp_path / "nowhere", SIZE, batch_size=2, workers=0)
    with pytest.raises(DataError, match="workers"):
        folder_loader(tmp_path, SIZE, batch_size=2, workers=-1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_missing_device_is_refused_before_work(imagenet_like):
    with pytest.raises(ConfigError, match="CUDA is not available"):
        folder_loader(imagenet_like, SIZE, split="val", batch_size=2, workers=0, device="cuda")
