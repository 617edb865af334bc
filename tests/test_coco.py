"""COCO-format data: the synthetic writer, the reader and its one-line errors."""

import json

import pytest
import torch

pytest.importorskip("pycocotools")

from vitrim.data.coco import load_coco, write_synthetic_coco
from tests.conftest import coco_items
from vitrim.errors import DataError


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    source = coco_items(20, 4, dark_margin=True)
    return write_synthetic_coco(tmp_path_factory.mktemp("coco") / "set", source, train=6, val=3, canvas=56, seed=1)


def test_synthetic_set_has_the_coco_layout_and_reads_back(coco):
    train = load_coco(coco, "train", image_size=56)
    val = load_coco(coco, "val", image_size=28)
    assert (coco / "annotations" / "instances_train.json").is_file() and len(list((coco / "train").iterdir())) == 6
    assert len(train) == 6 and len(val) == 3 and train.class_names == ["a", "b", "c", "d"]
    for target, classes in zip(train.targets, train.semantic):
        boxes = target["boxes"]
        assert (boxes[:, 2:] > boxes[:, :2]).all() and boxes.min() >= 0 and boxes.max() <= 56
        for mask, box in zip(target["masks"], boxes):  # every mask lies inside its box
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert xs.min() >= box[0] - 1 and xs.max() <= box[2] and ys.min() >= box[1] - 1 and ys.max() <= box[3]
        assert set(classes.unique().tolist()) <= {0, *[int(c) + 1 for c in target["labels"]]}
    assert val.images.shape == (3, 1, 28, 28) and val.semantic.shape == (3, 28, 28)


def test_same_seed_same_set(coco, tmp_path):
    source = coco_items(20, 4, dark_margin=True)
    again = write_synthetic_coco(tmp_path / "again", source, train=6, val=3, canvas=56, seed=1)
    assert (again / "annotations" / "instances_val.json").read_text() == \
        (coco / "annotations" / "instances_val.json").read_text()


def _edit(coco, tmp_path, change):
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(coco, copy)
    path = copy / "annotations" / "instances_val.json"
    data = json.loads(path.read_text())
    change(data, copy)
    path.write_text(json.dumps(data))
    return copy


def test_polygons_crowd_and_empty_images(coco, tmp_path):
    def change(data, root):
        data["annotations"][0]["segmentation"] = [[2, 2, 20, 2, 20, 20, 2, 20]]
        data["annotations"][0]["bbox"] = [2, 2, 18, 18]
        data["annotations"][1]["iscrowd"] = 1
        data["images"].append({"id": 99, "file_name": "none.png", "width": 56, "height": 56})

    loaded = load_coco(_edit(coco, tmp_path, change), "val", image_size=56)
    assert loaded.skipped == {"crowd": 1, "empty images": 1}
    assert loaded.targets[0]["masks"][0][5:15, 5:15].all()


@pytest.mark.parametrize("change, message", [
    (lambda d, r: d["annotations"][0].pop("bbox"), r"annotations\[0\] lacks bbox"),
    (lambda d, r: d["annotations"][0].update(bbox=[50, 50, 20, 20]), "outside the 56x56 image or of zero size"),
    (lambda d, r: d["annotations"][0].update(bbox=[1, 1, 0, 5]), "of zero size"),
    (lambda d, r: d["annotations"][0].update(category_id=77), "category_id 77, not among the categories"),
    (lambda d, r: (r / "val" / d["images"][0]["file_name"]).unlink(), "which is missing; copy the images"),
    (lambda d, r: d["annotations"][0].update(segmentation=[[1, 2, 3]]), "does not decode"),
])
def test_bad_records_are_one_line_naming_file_and_record(coco, tmp_path, change, message):
    with pytest.raises(DataError, match=message) as error:
        load_coco(_edit(coco, tmp_path, change), "val", image_size=56)
    assert "instances_val.json" in str(error.value) and "\n" not in str(error.value)
