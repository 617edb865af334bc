import gzip

import numpy as np
import pytest
import torch

from vitrim.data import load_dataset, load_idx_dir
from vitrim.data.dataset import ImageSet, random_crop_flip
from vitrim.data.fashion_mnist import idx_payload, locate_fashion_mnist
from vitrim.data.idx import parse_idx
from vitrim.errors import DataError


def write_idx_dir(directory, n_train=12, n_test=6, size=8, gz=False):
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, size, size), generator=g, dtype=torch.uint8)
        labels = torch.arange(n, dtype=torch.uint8) % 3
        for stem, tensor in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            payload = idx_payload(tensor)
            if gz:
                (directory / (stem + ".gz")).write_bytes(gzip.compress(payload))
            else:
                (directory / stem).write_bytes(payload)
    return directory


@pytest.mark.parametrize("gz", [False, True])
def test_idx_directory_loads(tmp_path, gz):
    write_idx_dir(tmp_path / "d", gz=gz)
    train = load_dataset(f"idx:{tmp_path / 'd'}", "train")
    test = load_dataset(f"idx:{tmp_path / 'd'}", "test")
    assert train.images.shape == (12, 1, 8, 8) and train.images.dtype == torch.uint8
    assert len(test) == 6 and test.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert test.class_names == ["0", "1", "2"]


def test_truncated_idx_is_reported(tmp_path):
    write_idx_dir(tmp_path / "d")
    path = tmp_path / "d" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte is truncated or corrupt"):
        load_idx_dir(tmp_path / "d", "test", name="d")


def test_truncated_gzip_is_reported(tmp_path):
    write_idx_dir(tmp_path / "d", gz=True)
    path = tmp_path / "d" / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_idx_dir(tmp_path / "d", "train", name="d")


def test_missing_idx_file_is_named(tmp_path):
    write_idx_dir(tmp_path / "d")
    (tmp_path / "d" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"has no t10k-labels-idx1-ubyte\[\.gz\]"):
        load_idx_dir(tmp_path / "d", "test", name="d")


def test_not_idx_is_reported():
    with pytest.raises(DataError, match="bad magic"):
        parse_idx(b"PK\x03\x04abcdefgh")


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr("vitrim.data.fashion_mnist.SYSTEM_DIR", tmp_path / "none")
    monkeypatch.setenv("VITRIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("VITRIM_OFFLINE", "1")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        locate_fashion_mnist()


def test_fashion_mnist_checksum_is_verified(tmp_path):
    write_idx_dir(tmp_path / "d")  # right format, wrong content
    with pytest.raises(DataError, match="wrong checksum"):
        load_dataset("fashion-mnist", "test", data_dir=tmp_path / "d")


def test_unknown_dataset_and_split():
    with pytest.raises(DataError, match="unknown dataset 'cifar'.*fashion-mnist"):
        load_dataset("cifar")
    with pytest.raises(DataError, match="unknown split"):
        load_dataset("idx:/nowhere", "val")


def test_image_folder(tmp_path):
    from PIL import Image

    for label, colour in (("cat", 40), ("dog", 200)):
        (tmp_path / "f" / label).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((20, 30, 3), colour + i, dtype=np.uint8)).save(tmp_path / "f" / label / f"{i}.png")
    (tmp_path / "f" / "dog" / "notes.txt").write_text("ignored")
    data = load_dataset(f"folder:{tmp_path / 'f'}", image_size=16, channels=3)
    assert data.images.shape == (4, 3, 16, 16) and data.class_names == ["cat", "dog"]
    assert data.labels.tolist() == [0, 0, 1, 1]
    assert data.images[2].mean().item() == pytest.approx(200 / 255, abs=1e-3)
    flat = load_dataset(f"folder:{tmp_path / 'f' / 'cat'}", image_size=16)  # no class sub-folders: unlabelled
    assert flat.labels is None and flat.class_names == [] and len(flat) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images .* and no class sub-folders; use one layout"):
        load_dataset(f"folder:{tmp_path / 'empty'}")
    (tmp_path / "f" / "loose.png").write_bytes((tmp_path / "f" / "cat" / "0.png").read_bytes())
    with pytest.raises(DataError, match=r"holds both images \(loose.png, ...\) and sub-folders \(cat/, ...\)"):
        load_dataset(f"folder:{tmp_path / 'f'}")


def test_batches_normalise_and_cover_every_image():
    images = torch.arange(10 * 4, dtype=torch.uint8).view(10, 1, 2, 2)
    data = ImageSet(images, torch.arange(10), [str(i) for i in range(10)], (0.5,), (0.25,))
    seen = torch.cat([y for _, y in data.batches(3, shuffle=True, generator=torch.Generator().manual_seed(1))])
    assert sorted(seen.tolist()) == list(range(10))
    x, _ = next(data.batches(10))
    torch.testing.assert_close(x, (images.float() / 255 - 0.5) / 0.25)
    assert sum(1 for _ in data.batches(3, drop_last=True)) == 3


def test_random_crop_flip_is_a_shifted_copy():
    x = torch.rand(64, 1, 6, 6)
    out = random_crop_flip(x, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape
    # every output is the input shifted (and maybe flipped) with zero fill: its values come from it
    for i in range(8):
        kept = out[i][out[i] != 0]
        assert torch.isin(kept, x[i]).all()


def test_real_fashion_mnist_when_installed():
    try:
        test = load_dataset("fashion-mnist", "test")
    except DataError:
        pytest.skip("Fashion-MNIST is not installed (make test installs it)")
    assert len(test) == 10000 and test.images.shape[1:] == (1, 28, 28)
    assert torch.bincount(test.labels).tolist() == [1000] * 10
