"""COCO-format detection/segmentation data: read the COCO 2017 layout, and write a synthetic set.

Layout (any split name): ``DIR/annotations/instances_<split>.json`` with the images in
``DIR/<split>/``. Boxes are ``[x, y, w, h]``; masks are polygons or RLE (compressed or not),
decoded with ``pycocotools`` (``pip install 'vitrim[dense]'``).

:func:`write_synthetic_coco` writes such a set for offline work and tests: real Fashion-MNIST items
and their pixel masks, placed at several scales on larger canvases with clutter, train/val
splits, a fixed seed. :func:`load_coco` reads one split into :class:`DenseSet` — images, per-image
boxes/labels/masks and a per-pixel class map for semantic segmentation — checking every record:
a bad one is one :class:`~vitrim.errors.DataError` naming the file, the record and the fix;
crowd annotations and images without annotations are skipped and counted, as COCO tools do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vitrim.errors import ConfigError, DataError
from vitrim.fsutil import atomic_dir, write_json

REQUIRED = {"images": ("id", "file_name", "width", "height"), "annotations": ("id", "image_id", "category_id", "bbox"),
            "categories": ("id", "name")}


def _pycocotools() -> Any:
    try:
        from pycocotools import mask
    except ImportError:
        raise ConfigError("COCO masks need pycocotools: pip install 'vitrim[dense]'") from None
    return mask


@dataclass
class DenseSet:
    """One split: ``images`` (N, C, S, S) uint8, per image a dict of ``boxes`` (K, 4) xyxy in
    pixels, ``labels`` (K,) category indices (0-based, in ``class_names`` order) and ``masks``
    (K, S, S) bool; ``semantic`` (N, S, S) long: 0 background, 1 + class elsewhere (later objects
    drawn over earlier ones); ``skipped`` counts what was left out and why."""

    images: torch.Tensor
    targets: list[dict[str, torch.Tensor]]
    semantic: torch.Tensor
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = "coco"
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def for_model(self, config: Any) -> "DenseSet":
        """This split normalised by a model's ``config.mean`` / ``config.std`` (what it was trained
        with; :func:`load_coco` leaves 0.5 / 0.5)."""
        return replace(self, mean=tuple(config.mean), std=tuple(config.std))

    def batch_targets(self, index: torch.Tensor, task: str) -> Any:
        """The ``task``'s targets of the images at ``index`` (B,): for ``"segment"`` their class maps
        (B, S, S), for ``"detect"`` the list of their box dicts (as a detector's loss reads them)."""
        if task == "segment":
            return self.semantic[index.cpu()]
        return [self.targets[int(i)] for i in index.cpu()]

    def subset(self, count: int) -> "DenseSet":
        """The first ``count`` images with their targets."""
        return self.span(0, count)

    def span(self, start: int, stop: int) -> "DenseSet":
        """Images ``start`` to ``stop`` (exclusive) with their targets."""
        return replace(self, images=self.images[start:stop], targets=self.targets[start:stop],
                       semantic=self.semantic[start:stop])

    def shard(self) -> "DenseSet":
        """This rank's contiguous share of the images under ``torchrun``
        (:func:`vitrim.distributed.shard`); the whole split in one process."""
        from vitrim import distributed

        mine = distributed.shard(range(len(self)))
        return self.span(mine.start, mine.stop)


# --- writing a synthetic set ----------------------------------------------------------------

def _place(canvas: np.ndarray, owner: np.ndarray, item: np.ndarray, x: int, y: int, index: int) -> None:
    """Paste ``item`` (h, w) at (x, y): its visible pixels overwrite the canvas and the owner map."""
    h, w = item.shape
    mask = item > 40
    region = canvas[y:y + h, x:x + w]
    region[mask] = item[mask]
    owner[y:y + h, x:x + w][mask] = index


def _clutter(canvas: np.ndarray, rng: np.random.Generator) -> None:
    """Faint strokes and speckle that belong to no object."""
    size = canvas.shape[0]
    for _ in range(int(rng.integers(2, 6))):
        x0, y0, x1, y1 = rng.integers(0, size, 4)
        steps = max(abs(int(x1) - int(x0)), abs(int(y1) - int(y0)), 1)
        xs = np.linspace(x0, x1, steps).astype(int)
        ys = np.linspace(y0, y1, steps).astype(int)
        canvas[ys, xs] = np.maximum(canvas[ys, xs], int(rng.integers(20, 38)))
    speckle = rng.random(canvas.shape) < 0.01
    canvas[speckle] = np.maximum(canvas[speckle], 30)


def _resize_item(item: torch.Tensor, size: int) -> np.ndarray:
    resized = F.interpolate(item[None, None].float(), size=(size, size), mode="bilinear", align_corners=False)
    return resized[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def _synthetic_split(source: Any, count: int, canvas: int, rng: np.random.Generator, items: tuple[int, int],
                     scales: tuple[float, float]) -> tuple[list[np.ndarray], list[list[dict[str, Any]]]]:
    """``count`` canvases and, per canvas, its objects' visible masks, boxes and classes."""
    mask_api = _pycocotools()
    images, objects = [], []
    for _ in range(count):
        picture = np.zeros((canvas, canvas), dtype=np.uint8)
        owner = np.full((canvas, canvas), -1, dtype=np.int64)
        _clutter(picture, rng)
        placed = []
        for index in range(int(rng.integers(items[0], items[1] + 1))):
            k = int(rng.integers(len(source)))
            size = min(canvas, max(8, int(28 * rng.uniform(*scales))))
            item = _resize_item(source.images[k, 0], size)
            x, y = (int(v) for v in rng.integers(0, canvas - size + 1, 2))
            _place(picture, owner, item, x, y, index)
            placed.append(int(source.labels[k]))
        records = []
        for index, label in enumerate(placed):
            visible = owner == index
            if visible.sum() < 16:  # hidden behind later items: not an object any more
                continue
            ys, xs = np.nonzero(visible)
            rle = mask_api.encode(np.asfortranarray(visible.astype(np.uint8)))
            records.append({"category": label, "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                                        int(ys.max() - ys.min() + 1)],
                            "area": int(visible.sum()),
                            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
        images.append(picture)
        objects.append(records)
    return images, objects


def write_synthetic_coco(out_dir: str | Path, source: Any, *, train: int = 2000, val: int = 500, canvas: int = 112,
                         items: tuple[int, int] = (1, 4), scales: tuple[float, float] = (0.75, 2.0),
                         seed: int = 0) -> Path:
    """Write a COCO-format set made of ``source``'s items (an :class:`~vitrim.data.ImageSet` of
    single-channel 28x28 images with labels, e.g. Fashion-MNIST's training split) to ``out_dir``
    (``train`` and ``val`` splits, compressed-RLE masks), atomically; returns ``out_dir``."""
    from PIL import Image

    if source.labels is None or source.images.shape[1] != 1:
        raise DataError(f"{source.name}: the synthetic COCO set is made of labelled single-channel items")
    if not (0 < items[0] <= items[1]) or not (0 < scales[0] <= scales[1]) or canvas < 28 or min(train, val) < 1:
        raise ConfigError("need 0 < items[0] <= items[1], 0 < scales[0] <= scales[1], canvas >= 28 and "
                          "at least one train and one val image")
    rng = np.random.default_rng(seed)
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(source.class_names)]
    with atomic_dir(out_dir) as tmp:
        for split, count in (("train", train), ("val", val)):
            (tmp / split).mkdir()
            pictures, objects = _synthetic_split(source, count, canvas, rng, items, scales)
            images, annotations = [], []
            for i, (picture, records) in enumerate(zip(pictures, objects)):
                name = f"{i:06d}.png"
                Image.fromarray(picture).save(tmp / split / name)
                images.append({"id": i + 1, "file_name": name, "width": canvas, "height": canvas})
                for r in records:
                    annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": r["category"] + 1,
                                        "bbox": r["bbox"], "area": r["area"], "segmentation": r["segmentation"],
                                        "iscrowd": 0})
            (tmp / "annotations").mkdir(exist_ok=True)
            write_json(tmp / "annotations" / f"instances_{split}.json",
                       {"images": images, "annotations": annotations, "categories": categories})
    return Path(out_dir)


# --- reading ----------------------------------------------------------------------------------

SPLIT_NAMES = {"train": ("train", "train2017"), "val": ("val", "val2017")}


def find_split(root: str | Path, kind: str, name: str | None = None) -> str:
    """The split of ``root`` to use as ``kind`` (``train`` or ``val``): ``name`` if given, else
    ``train``/``train2017`` (``val``/``val2017``), whichever has its annotations file."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"COCO directory {root} does not exist; write one with `vitrim coco-synthetic --out {root}` "
                        f"or point coco:DIR at DIR/annotations/instances_<split>.json")
    candidates = (name,) if name else SPLIT_NAMES[kind]
    for split in candidates:
        if (root / "annotations" / f"instances_{split}.json").is_file():
            return split
    wanted = " or ".join(f"annotations/instances_{s}.json" for s in candidates)
    raise DataError(f"{root} has no {wanted}; a COCO split is annotations/instances_<split>.json beside a "
                    f"<split>/ folder of images" + ("" if name else f" (name another split with --{kind}-split)"))


def split_image_size(root: str | Path, split: str) -> int | None:
    """The one square size of every image of ``split``, or None when the sizes differ."""
    data = _read_annotations(Path(root) / "annotations" / f"instances_{split}.json")
    sizes = {(im["width"], im["height"]) for im in data["images"]}
    if len(sizes) != 1:
        return None
    width, height = sizes.pop()
    return int(width) if width == height and isinstance(width, int) else None


def _read_annotations(path: Path) -> dict[str, Any]:
    fix = "a COCO split is annotations/instances_<split>.json beside a <split>/ folder of images"
    if not path.is_file():
        raise DataError(f"{path} is missing; {fix}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} must be a JSON object with images, annotations and categories")
    for section, keys in REQUIRED.items():
        records = data.get(section)
        if not isinstance(records, list):
            raise DataError(f"{path} has no {section!r} list; {fix}")
        for i, record in enumerate(records):
            missing = [k for k in keys if not isinstance(record, dict) or k not in record]
            if missing:
                raise DataError(f"{path}: {section}[{i}] lacks {', '.join(missing)}; every {section[:-1]} needs "
                                f"{', '.join(keys)}")
    return data


def _decode_mask(segmentation: Any, height: int, width: int, where: str) -> np.ndarray:
    mask_api = _pycocotools()
    try:
        if isinstance(segmentation, list):  # polygons
            if not segmentation or any(len(p) < 6 or len(p) % 2 for p in segmentation):
                raise ValueError("each polygon needs at least three x, y pairs")
            rle = mask_api.merge(mask_api.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):  # uncompressed RLE
            rle = mask_api.frPyObjects(segmentation, height, width)
        elif isinstance(segmentation, dict):
            rle = dict(segmentation, counts=segmentation["counts"].encode("ascii")
                       if isinstance(segmentation.get("counts"), str) else segmentation.get("counts"))
        else:
            raise ValueError(f"segmentation is {type(segmentation).__name__}, not polygons or RLE")
        return mask_api.decode(rle).astype(bool)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise DataError(f"{where}: the segmentation does not decode ({exc}); write polygons [[x1, y1, ...]] "
                        f"or RLE {{'size': [h, w], 'counts': ...}}") from None


def load_coco(root: str | Path, split: str, image_size: int, channels: int = 1) -> DenseSet:
    """Split ``split`` of the COCO-layout set at ``root``, every image resized to ``image_size``
    (boxes and masks with it), checked record by record."""
    from PIL import Image

    root = Path(root)
    path = root / "annotations" / f"instances_{split}.json"
    data = _read_annotations(path)
    categories = {c["id"]: i for i, c in enumerate(data["categories"])}
    by_image: dict[Any, list[dict[str, Any]]] = {}
    skipped = {"crowd": 0, "empty images": 0}
    images_by_id = {im["id"]: im for im in data["images"]}
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}] (id {ann['id']})"
        if ann["category_id"] not in categories:
            raise DataError(f"{where} has category_id {ann['category_id']}, not among the categories "
                            f"({', '.join(str(c) for c in categories)}); fix the id or add the category")
        if ann["image_id"] not in images_by_id:
            raise DataError(f"{where} refers to image_id {ann['image_id']}, which the file does not list")
        if ann.get("iscrowd", 0):
            skipped["crowd"] += 1
            continue
        image = images_by_id[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > image["width"] + 1e-6 or y + h > image["height"] + 1e-6:
            raise DataError(f"{where} has bbox {ann['bbox']} outside the {image['width']}x{image['height']} image "
                            f"or of zero size; boxes are [x, y, width, height] inside the image")
        by_image.setdefault(ann["image_id"], []).append(ann)
    pictures, targets, semantic = [], [], []
    for image in data["images"]:
        anns = by_image.get(image["id"], [])
        if not anns:
            skipped["empty images"] += 1
            continue
        file = root / split / image["file_name"]
        if not file.is_file():
            raise DataError(f"{path}: image {image['id']} names {file}, which is missing; copy the images into "
                            f"{root / split}")
        with Image.open(file) as opened:
            picture = np.asarray(opened.convert("L" if channels == 1 else "RGB"))
        H, W = picture.shape[:2]
        masks = np.stack([_decode_mask(a.get("segmentation", []), H, W, f"{path}: annotation id {a['id']}")
                          for a in anns])
        pictures.append(torch.from_numpy(picture.copy()).reshape(H, W, channels).permute(2, 0, 1))
        targets.append(_resized_target(anns, masks, categories, W, H, image_size))
        classes = torch.zeros(image_size, image_size, dtype=torch.long)
        for mask, label in zip(targets[-1]["masks"], targets[-1]["labels"]):
            classes[mask] = int(label) + 1
        semantic.append(classes)
    if not pictures:
        raise DataError(f"{path} has no image with annotations; nothing to train or evaluate on")
    images = torch.stack([F.interpolate(p[None].float(), size=(image_size, image_size), mode="bilinear",
                                        align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
                          for p in pictures])
    names = [c["name"] for c in data["categories"]]
    return DenseSet(images, targets, torch.stack(semantic), names, (0.5,) * channels, (0.5,) * channels,
                    name=f"{root.name}/{split}", skipped={k: v for k, v in skipped.items() if v})


def _resized_target(anns: list[dict[str, Any]], masks: np.ndarray, categories: dict[Any, int], width: int,
                    height: int, size: int) -> dict[str, torch.Tensor]:
    sx, sy = size / width, size / height
    boxes = torch.tensor([[a["bbox"][0] * sx, a["bbox"][1] * sy, (a["bbox"][0] + a["bbox"][2]) * sx,
                           (a["bbox"][1] + a["bbox"][3]) * sy] for a in anns], dtype=torch.float32)
    resized = F.interpolate(torch.from_numpy(masks)[None].float(), size=(size, size), mode="nearest")[0] > 0.5
    labels = torch.tensor([categories[a["category_id"]] for a in anns], dtype=torch.long)
    return {"boxes": boxes, "labels": labels, "masks": resized}
