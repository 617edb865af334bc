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


def test_files_that_are_not_images_are_skipped_as_in_memory(imagenet_like):
    (imagenet_like / "train" / "n01" / "labels.txt").write_text("n01\n")
    (imagenet_like / "train" / "n01" / ".DS_Store").write_bytes(b"")
    dataset = ImageFolderDataset(imagenet_like / "train", SIZE)
    assert len(dataset) == len(load_image_folder(imagenet_like / "train", SIZE)) == 12
    assert all(f.suffix in (".png", ".JPEG") for f in dataset.files)


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


# ---------------------------------------------------------------- FolderSet: a lazy ImageSet


def decoded_reference(root, size: int):
    """The folder decoded in memory and rounded to uint8, as the lazy set's workers deliver it."""
    from vitrim.data import ImageSet

    eager = load_image_folder(root, size)
    pixels = eager.images.mul(255).round().clamp(0, 255).to(torch.uint8)
    return ImageSet(pixels, eager.labels, eager.class_names, eager.mean, eager.std)


@pytest.mark.parametrize("workers", [0, 2])
def test_folder_set_batches_as_an_image_set_would(imagenet_like, workers):
    from vitrim.data import load_dataset
    from vitrim.data.loader import FolderSet

    lazy = load_dataset(f"folder:{imagenet_like}", "train", image_size=SIZE, workers=workers)
    assert isinstance(lazy, FolderSet) and lazy.workers == workers and len(lazy) == 12
    reference = decoded_reference(imagenet_like / "train", SIZE)
    assert torch.equal(lazy.labels, reference.labels) and lazy.class_names == reference.class_names
    options = dict(shuffle=True, augment=("crop", "flip"), drop_last=True, image_size=16)
    got = list(lazy.batches(5, generator=torch.Generator().manual_seed(7), **options))
    want = list(reference.batches(5, generator=torch.Generator().manual_seed(7), **options))
    assert len(got) == len(want) == 2
    for (x, y), (rx, ry) in zip(got, want):
        assert torch.equal(y, ry)
        torch.testing.assert_close(x, rx, rtol=0, atol=1e-6)
    part = lazy.take(torch.tensor([11, 0, 5])).subset(2)
    assert part.labels.tolist() == [2, 0]
    torch.testing.assert_close(next(part.batches(2))[0], next(reference.take(torch.tensor([11, 0])).batches(2))[0])
    assert lazy.resized(8).image_size == 8 and next(lazy.resized(8).batches(3))[0].shape == (3, 3, 8, 8)
    with pytest.raises(DataError, match=r"read lazily .*\.batches"):
        lazy.images


def test_folder_too_large_for_ram_is_read_lazily(imagenet_like, monkeypatch):
    from vitrim import limits
    from vitrim.data import ImageSet, load_dataset
    from vitrim.data.loader import FolderSet

    assert type(load_dataset(f"folder:{imagenet_like}", "val", image_size=SIZE)) is ImageSet
    monkeypatch.setattr(limits, "physical_ram", lambda: 4 * 6 * 3 * SIZE * SIZE * 4 - 1)  # a quarter just short
    lazy = load_dataset(f"folder:{imagenet_like}", "val", image_size=SIZE)
    assert isinstance(lazy, FolderSet) and len(lazy) == 6


def test_evaluate_on_a_lazy_folder_reports_both_rates(imagenet_like):
    import vitrim
    from vitrim.data import load_dataset
    from vitrim import BlockDims, ViTConfig

    cfg = ViTConfig(image_size=SIZE, patch_size=8, in_chans=3, num_classes=3, embed_dim=16,
                    blocks=[BlockDims(heads=2, qk_dim=8, v_dim=8, mlp_dim=32)])
    model = vitrim.create(cfg, seed=0)
    lazy = load_dataset(f"folder:{imagenet_like}", "train", image_size=SIZE, workers=2)
    got = vitrim.evaluate(model, lazy, batch_size=5)
    want = vitrim.evaluate(model, decoded_reference(imagenet_like / "train", SIZE), batch_size=5)
    assert got["count"] == want["count"] == 12 and got["accuracy"] == want["accuracy"]
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
    assert got["data_images_per_s"] > 0 and got["model_images_per_s"] > 0


def test_cli_workers_option(imagenet_like, tmp_path, capsys):
    import vitrim
    from vitrim.cli import main
    from vitrim import BlockDims, ViTConfig

    cfg = ViTConfig(image_size=SIZE, patch_size=8, in_chans=3, num_classes=3, embed_dim=16,
                    blocks=[BlockDims(heads=2, qk_dim=8, v_dim=8, mlp_dim=32)])
    vitrim.save(vitrim.create(cfg, seed=0), tmp_path / "m")
    data = f"folder:{imagenet_like}"
    assert main(["eval", str(tmp_path / "m"), "--data", data, "--split", "test", "--workers", "1"]) in (0, None)
    out = capsys.readouterr().out
    assert "(6 images)" in out and "images/s: data" in out and "limits)" in out
    with pytest.raises(SystemExit) as info:
        main(["eval", str(tmp_path / "m"), "--data", data, "--workers", "-1"])
    assert info.value.code == 2 and "expected 0 (decode in this process) to 256" in capsys.readouterr().err
