"""The bundled Fashion-MNIST reference model loads offline and is as accurate as recorded."""

import json
from importlib import resources

import vitrim
from vitrim.data import load_dataset
from vitrim.models import get_preset


def test_bundled_model_loads_with_its_preset_shape():
    model = vitrim.load("fmnist-vit")
    assert model.config == get_preset("fmnist-vit").build()
    assert sum(p.numel() for p in model.parameters()) == 2_684_554


def test_bundled_model_records_how_it_was_trained():
    saved = json.loads((resources.files("vitrim") / "weights" / "fmnist-vit" / "config.json").read_text())
    assert saved["training"]["command"].startswith("vitrim train --model fmnist-vit")
    assert len(saved["training"]["history"]) == saved["training"]["config"]["epochs"]


def test_bundled_model_accuracy_on_test_images():
    model = vitrim.load("fmnist-vit")
    saved = json.loads((resources.files("vitrim") / "weights" / "fmnist-vit" / "config.json").read_text())
    recorded = saved["training"]["history"][-1]["test_accuracy"]
    subset = load_dataset("fashion-mnist", "test").subset(2000)
    accuracy = vitrim.evaluate(model, subset)["accuracy"]
    assert abs(accuracy - recorded) < 0.02  # the first 2000 images track the full test set
