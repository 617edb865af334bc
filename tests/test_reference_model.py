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


def test_197_token_reference_loads_at_deits_token_count_with_its_recorded_accuracy():
    model = vitrim.load("fmnist-vit-197")
    assert model.config == get_preset("fmnist-vit-197").build() and model.config.num_tokens == 197
    saved = json.loads((resources.files("vitrim") / "weights" / "fmnist-vit-197" / "config.json").read_text())
    command = saved["training"]["command"]
    assert "--init fmnist-vit" in command and "--image-size 56" in command
    recorded = saved["training"]["history"][-1]["test_accuracy"]
    subset = load_dataset("fashion-mnist", "test").subset(400).resized(56)
    accuracy = vitrim.evaluate(model, subset)["accuracy"]
    assert abs(accuracy - recorded) < 0.04  # the first 400 images track the full test set
