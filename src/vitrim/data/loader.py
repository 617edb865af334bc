"""Image folders loaded lazily through ``torch.utils.data.DataLoader``: worker processes decode and
resize the images in parallel, so a folder of ImageNet's size need not fit in RAM.

The layouts are those of :func:`vitrim.data.load_image_folder` (``DIR/<split>/<class>/<image>``,
``DIR/<class>/<image>``, or a flat ``DIR/<image>`` that is unlabelled) and so are the pixels: the
same decoding and resize + centre crop, rounded to uint8 in the workers (4x less to pass between
processes and to copy to the device), normalised with the model's mean/std where the batch lands.
:class:`FolderSet` wraps the same decoding in the :class:`vitrim.data.ImageSet` interface, so every
command and library function that takes an image set takes a folder that does not fit in RAM.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from vitrim.data.dataset import ImageSet, normalize
from vitrim.data.image_folder import default_stats, load_resized, scan_folder
from vitrim.device import resolve_device
from vitrim.errors import DataError

Batch = tuple[torch.Tensor, torch.Tensor | None]  # normalised images (B, C, S, S), labels (B,) or None


@dataclass(frozen=True)
class LoadFailure:
    """What a worker returns instead of a sample it could not decode (raised in the main process)."""

    message: str


class ImageFolderDataset(Dataset):
    """The images of one folder, decoded on access: ``dataset[i]`` is ``(uint8 (C, S, S), label)``.

    ``label`` is -1 when the folder is unlabelled (flat). The folder is scanned when the dataset is
    made (names only, no decoding): an empty folder or a file that is not an image is refused then.
    An image that cannot be decoded gives a :class:`LoadFailure` (its message names the file),
    which :class:`FolderLoader` raises as a :class:`DataError` in the main process.
    """

    def __init__(self, root: str | Path, image_size: int, channels: int = 3) -> None:
        try:
            import PIL.Image  # noqa: F401 - load_resized needs it
        except ImportError:
            raise DataError("image folders need Pillow: pip install pillow") from None
        self.mode = {1: "L", 3: "RGB"}.get(channels)
        if self.mode is None:
            raise DataError(f"image folders support 1 or 3 channels, got {channels}; pass channels=1 or 3")
        if int(image_size) < 1:
            raise DataError(f"image_size must be a positive integer, got {image_size}")
        self.root, self.image_size, self.channels = Path(root), int(image_size), channels
        files, labels, self.class_names = scan_folder(self.root)
        # a numpy array of paths relative to root, not a list of objects: forked workers touching
        # per-item refcounts would copy a list's pages one by one (ImageNet's train split: 1.28 M
        # names of ~30 bytes, 40 MB shared, where Path objects would take several 100 MB per worker)
        self._paths = np.array([os.fsencode(f.relative_to(self.root)) for f in files], dtype=np.bytes_)
        self.labels = np.array(labels, dtype=np.int64)

    @property
    def files(self) -> list[Path]:
        """The image files, in the order of the indices (classes in sorted folder order, names sorted)."""
        return [self.root / os.fsdecode(p) for p in self._paths]

    @property
    def labelled(self) -> bool:
        """Whether the folder has class sub-folders (else every label is -1)."""
        return bool(self.class_names)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | LoadFailure:
        path = self.root / os.fsdecode(self._paths[index])
        try:
            image = load_resized(path, self.mode, self.image_size)
        except DataError as exc:  # passed to the main process as data: one line, not a worker traceback
            return LoadFailure(str(exc))
        return image.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8), int(self.labels[index])


def collate(samples: list) -> tuple[torch.Tensor, torch.Tensor] | LoadFailure:
    """Stack ``(image, label)`` samples into uint8 images (B, C, S, S) and labels (B,); the first
    :class:`LoadFailure` in the batch instead, if any."""
    for sample in samples:
        if isinstance(sample, LoadFailure):
            return sample
    return torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples], dtype=torch.long)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # each worker resizes on one core; the workers are the parallelism


class FolderLoader(DataLoader):
    """A :class:`~torch.utils.data.DataLoader` over an :class:`ImageFolderDataset` whose batches are
    ``(images, labels)`` as :meth:`vitrim.data.ImageSet.batches` gives them: float (B, C, S, S)
    normalised with ``mean``/``std`` on ``device``, and labels (B,) or ``None`` when unlabelled.
    An image that cannot be decoded raises one :class:`DataError` naming the file."""

    def __init__(self, dataset: ImageFolderDataset, *, mean: tuple[float, ...], std: tuple[float, ...],
                 device: torch.device, **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self.mean, self.std, self.device = tuple(mean), tuple(std), device

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]
        non_blocking = self.pin_memory and self.device.type == "cuda"
        labelled = self.dataset.labelled
        for batch in super().__iter__():
            if isinstance(batch, LoadFailure):
                raise DataError(batch.message)
            images, labels = batch
            x = images.to(self.device, non_blocking=non_blocking).float().div_(255.0)
            with torch.device(self.device):  # normalize's mean/std tensors
                x = normalize(x, self.mean, self.std)
            y = labels.to(self.device, non_blocking=non_blocking) if labelled else None
            yield x, y


def _distributed() -> tuple[int, int]:
    """(rank, world size) of an initialised default process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def folder_loader(root: str | Path, image_size: int, *, split: str | None = None, batch_size: int = 64,
                  workers: int = 4, channels: int = 3, shuffle: bool = False, seed: int = 0,
                  device: str | torch.device | None = None, mean: tuple[float, ...] | None = None,
                  std: tuple[float, ...] | None = None, drop_last: bool = False) -> FolderLoader:
    """A lazy loader over the image folder ``root`` (``root/<split>`` when that folder exists).

    ``workers`` processes decode, resize (short side to ``image_size``) and centre-crop in
    parallel; 0 decodes in this process. Batches are normalised with ``mean``/``std`` (default:
    ImageNet's for 3 channels, 0.5 for 1) and land on ``device`` (default CPU), from pinned memory
    when it is CUDA (a spec of :func:`vitrim.device.resolve_device`: "cpu", "cuda", "cuda:N", "auto").
    ``shuffle`` draws the order from ``seed``: the same seed gives the same order
    whatever ``workers`` is, and each new pass over the loader the next permutation. Under an
    initialised ``torch.distributed`` process group each rank reads its own share of the images
    (a :class:`~torch.utils.data.DistributedSampler`), so the global batch is ``batch_size`` x world size.
    """
    if int(batch_size) < 1:
        raise DataError(f"batch size must be a positive integer, got {batch_size}")
    if int(workers) < 0:
        raise DataError(f"workers must be 0 (decode in this process) or more, got {workers}")
    root = Path(root)
    if split is not None and (root / split).is_dir():
        root = root / split
    dataset = ImageFolderDataset(root, image_size, channels)
    target = resolve_device(device) if device is not None else torch.device("cpu")
    default_mean, default_std = default_stats(channels)
    rank, world = _distributed()
    options: dict = {}
    if world > 1:
        options["sampler"] = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed,
                                                drop_last=drop_last)
    else:
        options.update(shuffle=shuffle, generator=torch.Generator().manual_seed(seed) if shuffle else None)
    if workers:
        options.update(worker_init_fn=_worker_init, persistent_workers=True, prefetch_factor=4)
    return FolderLoader(dataset, mean=mean or default_mean, std=std or default_std, device=target,
                        batch_size=int(batch_size), num_workers=int(workers), collate_fn=collate,
                        pin_memory=target.type == "cuda", drop_last=drop_last, **options)


def loader_throughput(loader: DataLoader, batches: int) -> float:
    """Images per second ``loader`` delivers over ``batches`` batches, timed after its first batch
    (worker start-up is not counted). Fewer batches are timed if the loader runs out first."""
    if int(batches) < 1:
        raise DataError(f"batches must be a positive integer, got {batches}")
    iterator = iter(loader)
    first = next(iterator, None)
    if first is None:
        raise DataError("the loader gave no batch; use a folder with at least one batch of images")
    device = first[0].device
    images, started = 0, time.perf_counter()
    for _, (x, _) in zip(range(int(batches)), iterator):
        images += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    if images == 0:
        raise DataError("the loader gave only one batch, and the first is not timed; use a smaller batch_size "
                        "or more images")
    return images / seconds


def auto_workers() -> int:
    """Decoding processes when none are asked for: this process's share of the cores (torchrun's
    ``LOCAL_WORLD_SIZE`` processes share them), at most 8; 0 when that share is a single core."""
    from vitrim.distributed import local_world_size

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = cores // local_world_size()
    return 0 if share < 2 else min(8, share)


class FolderSet(ImageSet):
    """An image folder as an :class:`~vitrim.data.ImageSet` whose images are decoded when a batch
    is asked for, by ``workers`` processes (0: in this process), never held all at once.

    Labels, class names, :meth:`subset`, :meth:`take`, :meth:`resized` and :meth:`batches` behave
    as an in-memory set's; the pixels are those of :func:`vitrim.data.load_image_folder` rounded
    to uint8. ``images`` is not available (the point is not to hold them).
    """

    def __init__(self, dataset: ImageFolderDataset, *, mean: tuple[float, ...], std: tuple[float, ...],
                 workers: int | None = None, indices: torch.Tensor | None = None, name: str | None = None) -> None:
        if workers is not None and int(workers) < 0:
            raise DataError(f"workers must be 0 (decode in this process) or more, got {workers}")
        self.dataset, self.mean, self.std = dataset, tuple(mean), tuple(std)
        self.workers = auto_workers() if workers is None else int(workers)
        self.indices = torch.arange(len(dataset)) if indices is None else indices  # (N,) into dataset
        self.class_names = list(dataset.class_names)
        self.name = name or str(dataset.root)
        self.inferred_classes = False
        all_labels = torch.from_numpy(dataset.labels)
        self.labels = all_labels[self.indices] if dataset.labelled else None  # (N,) or unlabelled

    @property
    def images(self) -> torch.Tensor:  # type: ignore[override]
        raise DataError(f"{self.name} is read lazily (a folder decoded batch by batch); iterate over "
                        f".batches(...) instead of reading .images")

    def __repr__(self) -> str:
        return (f"FolderSet({self.name!r}, {len(self)} images at {self.image_size}x{self.image_size}, "
                f"{len(self.class_names)} classes, workers={self.workers})")

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def channels(self) -> int:
        return self.dataset.channels

    @property
    def image_size(self) -> int:
        return self.dataset.image_size

    def take(self, index: torch.Tensor | slice) -> "FolderSet":
        return FolderSet(self.dataset, mean=self.mean, std=self.std, workers=self.workers,
                         indices=self.indices[index], name=self.name)

    def resized(self, image_size: int, chunk: int = 1024) -> "FolderSet":
        """The same images decoded at ``image_size`` (nothing is decoded now)."""
        if image_size == self.image_size:
            return self
        dataset = copy.copy(self.dataset)
        dataset.image_size = int(image_size)
        return FolderSet(dataset, mean=self.mean, std=self.std, workers=self.workers, indices=self.indices,
                         name=self.name)

    def _images_of(self, chunks: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Each chunk's images as uint8 ``(B, C, S, S)``, decoded by the workers in order."""
        if not chunks:
            return
        options: dict = {"worker_init_fn": _worker_init, "prefetch_factor": 2} if self.workers else {}
        # a generator of its own: the loader's worker seed is not drawn from torch's global RNG, so
        # dropout and drop-path draw what they would with an in-memory set
        loader = DataLoader(self.dataset, batch_sampler=[self.indices[c].tolist() for c in chunks],
                            num_workers=self.workers, collate_fn=collate, generator=torch.Generator(), **options)
        for batch in loader:
            if isinstance(batch, LoadFailure):
                raise DataError(batch.message)
            yield batch[0]


def folder_set(root: str | Path, image_size: int, channels: int = 3, *, workers: int | None = None,
               mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> FolderSet:
    """The image folder ``root`` as a lazily decoded :class:`FolderSet` (layouts as
    :func:`vitrim.data.load_image_folder`; ``workers`` decoding processes, default :func:`auto_workers`)."""
    dataset = ImageFolderDataset(root, image_size, channels)
    default_mean, default_std = default_stats(channels)
    return FolderSet(dataset, mean=mean or default_mean, std=std or default_std, workers=workers)


__all__ = ["FolderLoader", "FolderSet", "ImageFolderDataset", "LoadFailure", "auto_workers", "folder_loader",
           "folder_set", "loader_throughput", "scan_folder"]
