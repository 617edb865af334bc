"""The YOLOS family: exact conversion both ways, pruning by the detector's own loss, saving and refusals."""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("scipy")
pytest.importorskip("pycocotools")

import vitrim
from tests.conftest import coco_items
from tests.test_surgery import random_plan
from vitrim.adapters import family_of
from vitrim.adapters.families import yolos
from vitrim.adapters.hf_common import hf_metadata
from vitrim.bench.flops import model_cost
from vitrim.data.coco import load_coco, write_synthetic_coco
from vitrim.data.dataset import ImageSet
from vitrim.errors import ConfigError
from vitrim.prune.surgery import slice_model

IMAGE, TOKENS, LABELS = 32, 3, 3


def tiny(**overrides) -> torch.nn.Module:
    """A random YOLOS detector (32 px images, 8 px patches, 3 detection tokens) with non-trivial weights."""
    options = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                   image_size=[IMAGE, IMAGE], patch_size=8, num_detection_tokens=TOKENS,
                   use_mid_position_embeddings=False, num_labels=LABELS)
    options.update(overrides)
    torch.manual_seed(0)
    model = transformers.YolosForObjectDetection(transformers.YolosConfig(**options)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def assert_detects_like(canonical, expected, x, atol: float = 1e-6) -> None:
    """``yolos.detect(canonical, x)`` gives the HF model's ``expected`` logits and boxes."""
    logits, boxes = yolos.detect(canonical, x)
    torch.testing.assert_close(logits, expected.logits, atol=atol, rtol=0)
    torch.testing.assert_close(boxes, expected.pred_boxes, atol=atol, rtol=0)


def max_diff(a, b) -> float:
    return max((a.logits - b.logits).abs().max().item(), (a.pred_boxes - b.pred_boxes).abs().max().item())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = write_synthetic_coco(tmp_path_factory.mktemp("yolos") / "set", coco_items(12, LABELS), train=2, val=8,
                                canvas=IMAGE, seed=3)
    return load_coco(root, "val", image_size=IMAGE, channels=3)


def normalised(data, count: int) -> torch.Tensor:
    mean = torch.tensor(yolos.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(yolos.IMAGENET_STD)[:, None, None]
    return (data.images[:count].float() / 255 - mean) / std


@pytest.mark.parametrize("overrides", [{}, {"qkv_bias": False, "hidden_act": "gelu_pytorch_tanh"}],
                         ids=["default", "no-qkv-bias-tanh"])
def test_conversion_is_exact_both_ways(overrides):
    model = tiny(**overrides)
    x = torch.randn(2, 3, IMAGE, IMAGE)
    canonical = vitrim.adapters.to_canonical(model)
    assert family_of(model) == "hf-yolos" and canonical.config.reg_tokens == TOKENS
    with torch.no_grad():
        expected = model(x)
        assert_detects_like(canonical, expected, x)
        back = yolos.from_canonical(canonical, hf_metadata(model))
        assert type(back) is type(model)
        assert max_diff(back(x), expected) == 0


def test_detection_tokens_are_registers_after_the_class_token():
    """Canonical order [class, detection, patches]; YOLOS's [class, patches, detection]: the same tokens."""
    model = tiny()
    canonical = yolos.to_canonical(model)
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        hf = model(x).last_hidden_state  # (B, 1 + P + D, C)
        ours = canonical.forward_features(x)  # (B, 1 + D + P, C)
    reordered = torch.cat([ours[:, :1], ours[:, 1 + TOKENS:], ours[:, 1:1 + TOKENS]], dim=1)
    torch.testing.assert_close(reordered, hf, atol=1e-6, rtol=0)
    assert canonical.num_prefix_tokens == 1 + TOKENS


def test_position_embeddings_are_resized_like_yolos():
    """Stored for 32 px (4x4 patches), run at 48 px (6x6): bicubic, the class and detection rows kept."""
    model = tiny()
    canonical = yolos.to_canonical(model, image_size=48)
    assert canonical.config.pos_embed_grid == 4 and canonical.config.grid_size == 6
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = model(x)
        assert_detects_like(canonical, expected, x)
        back = yolos.from_canonical(canonical, hf_metadata(model))
        assert back.config.image_size == [IMAGE, IMAGE] and max_diff(back(x), expected) == 0


def test_a_pruned_canonical_model_converts_back():
    """Whole heads, MLP units and both kinds of sub-layer; the detection heads untouched."""
    model = tiny()
    canonical = yolos.to_canonical(model)
    plan = random_plan(canonical.config, ["heads", "mlp", "attn_layer"], seed=1)
    plan.blocks[1].mlp_on = False
    pruned = slice_model(canonical, plan).eval()
    back = yolos.from_canonical(pruned, hf_metadata(model))
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        logits, boxes = yolos.detect(pruned, x)
        out = back(x)
    torch.testing.assert_close(out.logits, logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.pred_boxes, boxes, atol=1e-6, rtol=0)
    layers = back.vit.encoder.layer
    assert isinstance(layers[0].attention, yolos.RemovedSelfAttention)
    assert isinstance(layers[1].output, yolos.RemovedMlpOutput)
    assert layers[2].attention.attention.num_attention_heads == 3 and layers[2].intermediate.dense.out_features == 32
    for name in yolos.HEADS:
        for new, old in zip(getattr(back, name).parameters(), getattr(model, name).parameters()):
            assert torch.equal(new, old)


def test_the_loss_is_the_detectors_own(data):
    model = tiny()
    forward, loss_fn = yolos.yolos_loss(model, data)
    x = normalised(data, 3)
    with torch.no_grad():
        ours = loss_fn(forward(yolos.to_canonical(model), x), torch.tensor([0, 1, 2]))
        own = torch.stack([model(x[i:i + 1], labels=[yolos.yolos_targets(data.targets[i], IMAGE, IMAGE)]).loss
                           for i in range(3)])
    assert ours.shape == (3,)
    torch.testing.assert_close(ours, own, atol=1e-5, rtol=0)


def test_pruned_by_its_own_loss_to_a_flops_budget_reloads_in_its_class(data, tmp_path):
    model = tiny()
    result = yolos.prune_yolos(model, "flops=0.6", data, steps=1, round_to=2, progress=False)
    pruned = result.model
    assert type(pruned) is type(model)
    dense_flops = model_cost(yolos.to_canonical(model).config).flops
    pruned_cfg = yolos.to_canonical(pruned).config
    assert model_cost(pruned_cfg).flops <= 0.6 * dense_flops and pruned_cfg.embed_dim == 32
    assert result.config.objective == "labels" and "embed" not in result.config.structures
    for name in yolos.HEADS:
        torch.testing.assert_close(getattr(pruned, name).state_dict(), getattr(model, name).state_dict())
    vitrim.save(pruned, tmp_path / "pruned")
    again = vitrim.load(tmp_path / "pruned")
    assert type(again) is type(model)
    x = normalised(data, 2)
    with torch.no_grad():
        assert max_diff(again(x), pruned(x)) == 0


def test_the_cli_prunes_a_yolos_directory_by_its_own_loss(tmp_path, capsys):
    from vitrim.cli import main

    tiny().save_pretrained(tmp_path / "hf")
    root = write_synthetic_coco(tmp_path / "coco", coco_items(12, LABELS), train=6, val=2, canvas=IMAGE, seed=3)
    argv = ["prune", tmp_path / "hf", "--data", f"coco:{root}", "--target", "flops=0.6", "--steps", "1",
            "--round-to", "2", "--threads", "1", "--out", tmp_path / "pruned", "--json"]
    assert main([str(a) for a in argv]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["task"].startswith("detect (YOLOS") and report["kept_ratio"] <= 0.6
    assert report["pruned"]["backbone_flops"] <= 0.6 * report["dense"]["backbone_flops"]
    again = vitrim.load(tmp_path / "pruned")
    assert type(again).__name__ == "YolosForObjectDetection"
    assert (tmp_path / "pruned" / "report" / "report.json").is_file()


def test_pruning_without_a_loss_follows_the_output_features(data):
    """No task loss: the distance to the dense output tokens, detection tokens included."""
    model = tiny()
    calib = ImageSet(data.images, None, [], yolos.IMAGENET_MEAN, yolos.IMAGENET_STD)
    result = vitrim.prune(model, "flops=0.7", data=calib, calib_images=8, steps=1, round_to=2, progress=False)
    assert result.config.objective == "features" and type(result.model) is type(model)
    assert result.kept_ratio <= 0.7 and yolos.to_canonical(result.model).config.embed_dim == 32


def test_a_save_pretrained_directory_loads_in_its_class(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path / "hf")
    loaded = vitrim.load(tmp_path / "hf")
    x = torch.randn(1, 3, IMAGE, IMAGE)
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert max_diff(loaded(x), model(x)) == 0


def test_mid_position_embeddings_are_one_clear_error(tmp_path):
    model = tiny(use_mid_position_embeddings=True)
    with pytest.raises(ConfigError, match="use_mid_position_embeddings=True .* cannot express") as raised:
        vitrim.adapters.to_canonical(model)
    assert "\n" not in str(raised.value)
    with pytest.raises(ConfigError, match="use_mid_position_embeddings"):
        vitrim.prune(model, "flops=0.5", progress=False)
    model.save_pretrained(tmp_path / "hf")
    with pytest.raises(ConfigError, match="use_mid_position_embeddings"):
        vitrim.load(tmp_path / "hf")


def test_rectangular_images_are_refused():
    model = tiny(image_size=[32, 48])
    with pytest.raises(ConfigError, match=r"image_size \[32, 48\] is not square"):
        yolos.to_canonical(model)


def test_a_rectangular_model_is_squared_exactly_at_its_new_size():
    """The hustvl checkpoints store [800, 1333]: square(model, S) gives the same outputs at S x S."""
    model = tiny(image_size=[32, 48])
    squared = yolos.square(model, 40)
    assert squared.config.image_size == [40, 40]
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        expected = model(x)
        assert max_diff(squared(x), expected) == 0
        logits, boxes = yolos.detect(yolos.to_canonical(squared), x)
    torch.testing.assert_close(logits, expected.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(boxes, expected.pred_boxes, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["drop", "evit", "tome"])
def test_token_reduction_keeps_the_detection_tokens(method):
    model = tiny()
    reduced = vitrim.reduce_tokens(model, method, layers=(0, 1), keep=1.0)
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        expected = model(x)
        logits, boxes = yolos.detect(reduced, x)
        torch.testing.assert_close(logits, expected.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(boxes, expected.pred_boxes, atol=1e-5, rtol=0)
        reduced.keep = 0.5
        logits, boxes = yolos.detect(reduced, x)
    assert logits.shape == expected.logits.shape and boxes.shape == expected.pred_boxes.shape
    assert reduced.last_token_counts[-1] < reduced.last_token_counts[0]


def test_a_yolos_detector_refuses_onnx_export(tmp_path):
    from vitrim.quant import export

    with pytest.raises(ConfigError, match="does not export to ONNX"):
        export(tiny(), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_detections_are_the_image_processors_post_processing(data):
    """Each detection token's best real class, boxes in pixels: what YOLOS's own post-processing gives."""
    processor = pytest.importorskip("transformers").YolosImageProcessorPil()
    model = tiny()
    x = normalised(data, 2)
    with torch.no_grad():
        expected = processor.post_process_object_detection(model(pixel_values=x), threshold=0.0,
                                                           target_sizes=[(IMAGE, IMAGE)] * 2)
    for ours, theirs in zip(yolos.yolos_detections(model, x), expected):
        order = theirs["scores"].argsort(descending=True)
        torch.testing.assert_close(ours["scores"], theirs["scores"][order])
        torch.testing.assert_close(ours["labels"], theirs["labels"][order])
        torch.testing.assert_close(ours["boxes"], theirs["boxes"][order])


def test_the_cli_evaluates_a_yolos_directory_on_coco(tmp_path, capsys):
    from vitrim.cli import main

    tiny().save_pretrained(tmp_path / "hf")
    root = write_synthetic_coco(tmp_path / "coco", coco_items(12, LABELS), train=2, val=5, canvas=IMAGE, seed=3)
    assert main(["eval", str(tmp_path / "hf"), "--data", f"coco:{root}", "--threads", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["task"] == "detect (YOLOS)" and report["count"] == 5
    direct = yolos.evaluate_yolos(tiny(), load_coco(root, "val", image_size=IMAGE, channels=3))
    assert {k: report[k] for k in direct} == pytest.approx(direct)
    assert 0 <= report["map"] <= report["ap50"] <= 1


def test_evaluating_on_more_categories_than_the_detector_has_is_refused(data):
    from vitrim.errors import DataError

    with pytest.raises(DataError, match="categories but the model predicts 2"):
        yolos.evaluate_yolos(tiny(num_labels=2), data)


def _named(model, names, order):
    """``model`` with its real classes renamed ``names`` and moved to the class indices ``order``."""
    import copy

    moved = copy.deepcopy(model)
    last = moved.class_labels_classifier.layers[-1]
    with torch.no_grad():
        rows = torch.arange(last.weight.shape[0])
        rows[torch.tensor(order)] = torch.arange(len(order))  # class order[k] takes the old class k
        last.weight.copy_(last.weight[rows])
        last.bias.copy_(last.bias[rows])
    moved.config.id2label = {order[k]: names[k] for k in range(len(names))}
    moved.config.label2id = {name: i for i, name in moved.config.id2label.items()}
    return moved


def test_categories_are_matched_to_the_detectors_labels_by_name(data):
    """A detector whose classes sit at other indices (as COCO checkpoints number them by id) scores and
    trains alike: the data's categories are found by name in config.id2label."""
    names = list(data.class_names)
    plain = _named(tiny(), names, [0, 1, 2])
    shuffled = _named(plain, names, [2, 0, 1])
    assert yolos.class_indices(shuffled, data).tolist() == [2, 0, 1]
    assert yolos.evaluate_yolos(shuffled, data) == pytest.approx(yolos.evaluate_yolos(plain, data))
    index = torch.arange(4)
    forward, loss_fn = yolos.yolos_loss(plain, data)
    _, shuffled_loss = yolos.yolos_loss(shuffled, data)
    x = normalised(data, 4)
    with torch.no_grad():
        torch.testing.assert_close(shuffled_loss(yolos.detect(yolos.to_canonical(shuffled), x), index),
                                   loss_fn(forward(yolos.to_canonical(plain), x), index))


def test_categories_missing_from_the_detectors_labels_are_refused(data):
    from vitrim.errors import DataError

    names = list(data.class_names)
    partly = _named(tiny(), [names[0], names[1], "umbrella"], [0, 1, 2])
    with pytest.raises(DataError, match=r"categories \['.*'\] are not among the model's labels"):
        yolos.evaluate_yolos(partly, data)
