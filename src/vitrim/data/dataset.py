"""Image sets held as tensors (labelled, or unlabelled for label-free pruning), batched with
augmentation written in torch."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitrim.errors import DataError

AUGMENTATIONS = ("crop", "flip")  # random shift by 2 pixels; horizontal flip


@dataclass
class ImageSet:
    """Images ``(N, C, H, W)`` as uint8 (0..255) or float (0..1) and integer labels ``(N,)``.

    ``labels`` is ``None`` for an unlabelled set (a flat folder of images, ``class_names`` empty):
    it serves label-free pruning (``objective="features"``), and everything that needs labels —
    accuracy, :meth:`check_classes`, a classification loss, training — raises the
    :class:`DataError` of :meth:`require_labels`. ``inferred_classes`` marks class names guessed
    from the labels (an IDX directory names none), so a split lacking the last classes may list
    fewer than the model predicts.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = "images"
    inferred_classes: bool = False

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise DataError(f"{self.name}: images must be (N, C, H, W), got {tuple(self.images.shape)}")
        if self.labels is None:
            return
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"{self.name}: {self.images.shape[0]} images but labels of shape "
                            f"{tuple(self.labels.shape)}")
        if self.labels.dtype == torch.bool or self.labels.is_floating_point() or self.labels.is_complex():
            raise DataError(f"{self.name}: labels must be integers (class indices), got {self.labels.dtype}")
        if len(self.labels) and int(self.labels.min()) < 0:
            raise DataError(f"{self.name}: label {int(self.labels.min())} is negative; labels are class "
                            f"indices 0, 1, 2, ...")

    @property
    def labelled(self) -> bool:
        """Whether the images carry labels (an unlabelled set's ``labels`` is ``None``)."""
        return self.labels is not None

    def require_labels(self, use: str) -> torch.Tensor:
        """The labels ``(N,)``; a :class:`DataError` naming ``use`` and the fix if there are none."""
        if self.labels is None:
            raise DataError(f"{self.name} is unlabelled but {use} needs labels; put the images in one sub-folder "
                            f"per class (DIR/<class>/<image>), or, to prune, use objective='features' "
                            f"(--objective features), which needs none")
        return self.labels

    def check_classes(self, num_outputs: int, model: str = "the model") -> None:
        """A :class:`DataError` unless ``model``'s ``num_outputs`` logits fit these labels and classes.

        Every label must be below ``num_outputs``; unless the class names were inferred from the
        labels, the data set's class count must equal ``num_outputs`` too. Unlabelled data fails
        (:meth:`require_labels`).
        """
        self.require_labels(f"evaluation against {model}'s classes (accuracy, classification loss)")
        if len(self.labels) and int(self.labels.max()) >= num_outputs:
            raise DataError(f"{self.name} has labels up to {int(self.labels.max())} but {model} has "
                            f"{num_outputs} outputs (classes 0..{num_outputs - 1}); use data labelled for this "
                            f"model, or a model with at least {int(self.labels.max()) + 1} classes")
        if not self.inferred_classes and len(self.class_names) != num_outputs:
            raise DataError(f"{self.name} has {len(self.class_names)} classes but {model} has {num_outputs} "
                            f"outputs; evaluate it on data with {num_outputs} classes, or use a model "
                            f"trained for these {len(self.class_names)}")

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
        return self.take(slice(0, count))

    def take(self, index: torch.Tensor | slice) -> "ImageSet":
        """The images (and labels, if any) at ``index`` (K,) or in a slice, in that order."""
        labels = self.labels[index] if self.labels is not None else None
        return ImageSet(self.images[index], labels, self.class_names, self.mean, self.std, self.name,
                        self.inferred_classes)

    def resized(self, image_size: int, chunk: int = 1024) -> "ImageSet":
        """The images resized to ``image_size`` x ``image_size`` once, as floats in 0..1 (the
        resampling :meth:`batches` would apply to each batch; ``self`` if already that size)."""
        if self.image_size == image_size:
            return self
        parts = [F.interpolate(to_float(self.images[i:i + chunk]), size=(image_size, image_size), mode="bilinear",
                               antialias=True, align_corners=False) for i in range(0, len(self), chunk)]
        images = torch.cat(parts) if parts else self.images.float().new_zeros((0, self.channels, image_size,
                                                                             image_size))
        return ImageSet(images, self.labels, self.class_names, self.mean, self.std, self.name, self.inferred_classes)

    def batches(
        self,
        batch_size: int,
        *,
        image_size: int | None = None,
        shuffle: bool = False,
        augment: bool | Collection[str] = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        device: torch.device | str | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Normalised float batches ``(B, C, S, S)`` and labels ``(B,)`` (``None`` when unlabelled).

        ``augment``: the random transforms of :data:`AUGMENTATIONS` to apply ("crop", "flip");
        ``True`` means both. The order and the augmentation are drawn on the CPU (from
        ``generator``), so they do not depend on ``device``, where the batches are then resized,
        normalised and returned (default: the CPU).
        """
        ops = set(AUGMENTATIONS) if augment is True else set(augment or ())
        if batch_size < 1:
            raise DataError(f"batch size must be positive, got {batch_size}")
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        stop = len(self) - (len(self) % batch_size if drop_last else 0)
        chunks = [order[start : start + batch_size] for start in range(0, stop, batch_size)]
        for index, images in zip(chunks, self._images_of(chunks)):
            x = to_float(images)
            if ops:
                x = random_crop_flip(x, generator, crop="crop" in ops, flip="flip" in ops)
            y = self.labels[index] if self.labels is not None else None
            if device is not None:
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True) if y is not None else None
            yield self.prepare(x, image_size), y

    def _images_of(self, chunks: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The images ``(B, C, H, W)`` at each chunk of indices, in order (a lazy set decodes them)."""
        return (self.images[index] for index in chunks)

    def prepare(self, x: torch.Tensor, image_size: int | None = None) -> torch.Tensor:
        if image_size is not None and x.shape[-1] != image_size:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return normalize(x, self.mean, self.std)


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def random_crop_flip(x: torch.Tensor, generator: torch.Generator | None, pad: int = 2, *,
                     crop: bool = True, flip: bool = True) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (zero fill) and/or horizontal flip, per image."""
    if not crop:
        return random_flip(x, generator) if flip else x
    B, _, H, W = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
    dy, dx = dy.to(x.device), dx.to(x.device)  # drawn on the CPU generator: the same on every device
    rows = (dy.view(B, 1) + torch.arange(H, device=x.device).view(1, H))  # (B, H)
    cols = (dx.view(B, 1) + torch.arange(W, device=x.device).view(1, W))  # (B, W)
    batch = torch.arange(B, device=x.device).view(B, 1, 1)
    out = padded.permute(0, 2, 3, 1)[batch, rows.view(B, H, 1), cols.view(B, 1, W)]  # (B, H, W, C)
    out = out.permute(0, 3, 1, 2).contiguous()
    return random_flip(out, generator) if flip else out


def random_flip(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Horizontal flip of a random half of the images (in place)."""
    chosen = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    x[chosen] = x[chosen].flip(-1)
    return x
