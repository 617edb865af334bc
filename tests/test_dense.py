"""A ViT backbone with a simple feature pyramid and a segmentation head."""

import pytest
import torch

import vitrim
from vitrim.errors import ConfigError, ModelFileError
from vitrim.models import VisionTransformer, uniform_config
from vitrim.models.dense import DenseHeadConfig, DenseModel, SegmentationHead
from vitrim.tokens import reduce_tokens


def segmenter(**head) -> DenseModel:
    torch.manual_seed(0)
    backbone = VisionTransformer(uniform_config(3, 32, 2, image_size=32, patch_size=4, in_chans=1, num_classes=5,
                                                mean=(0.5,), std=(0.5,), layer_scale_init=0.5))
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return DenseModel(backbone, DenseHeadConfig(num_classes=4, **head)).eval()


@pytest.mark.parametrize("scales", [(2.0, 1.0, 0.5), (4.0, 1.0)])
def test_per_pixel_logits_at_the_input_size(scales):
    model = segmenter(scales=scales)
    out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 4, 32, 32)
    levels = model.pyramid(model.feature_map(torch.randn(1, 1, 32, 32)))
    assert [t.shape[-1] for t in levels] == [int(8 * s) for s in scales]


def test_saves_and_reloads_with_identical_outputs(tmp_path):
    model = segmenter(index=1)
    vitrim.save(model, tmp_path / "seg")
    again = vitrim.load(tmp_path / "seg")
    x = torch.randn(2, 1, 32, 32)
    assert type(again) is DenseModel and again.dense == model.dense
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)


def test_token_reduction_unmerges_for_the_head():
    """At keep=1 the reduced backbone is the backbone; merged tokens come back to their patches."""
    model = segmenter()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        dense = model(x)
        view = reduce_tokens(model.backbone, "tome", layers=(0, 1), keep=1.0)
        torch.testing.assert_close(model.use_reduced(view)(x), dense, atol=1e-5, rtol=0)
        view.keep = 0.5
        reduced = model(x)
    assert reduced.shape == dense.shape and view.last_token_counts[-1] < 65
    assert not torch.allclose(reduced, dense)
    with pytest.raises(ConfigError, match="must wrap this dense model's own backbone"):
        model.use_reduced(reduce_tokens(segmenter().backbone, "tome"))


def test_a_reduced_twin_shares_the_weights_and_leaves_the_model_as_it_was():
    model = segmenter().eval()
    x = torch.randn(2, 1, 32, 32)
    view = reduce_tokens(model.backbone, "tome", layers=(0, 1), keep=0.5)
    twin = model.through(view)
    with torch.no_grad():
        dense, reduced = model(x), twin(x)
    assert model.reduced is None and twin.reduced is view and not twin.training
    assert twin.head is model.head and twin.backbone is model.backbone
    assert not torch.allclose(dense, reduced)
    twin.head = torch.nn.Identity()  # replacing a module of the twin leaves the model's
    assert isinstance(model.head, SegmentationHead)


def test_bad_head_configs_and_files(tmp_path):
    with pytest.raises(ConfigError, match="pyramid scales must be among"):
        DenseHeadConfig(num_classes=3, scales=(3.0,))
    with pytest.raises(ConfigError, match="outside the model's 3 blocks"):
        DenseModel(segmenter().backbone, DenseHeadConfig(num_classes=3, index=5))
    vitrim.save(segmenter(), tmp_path / "seg")
    config = tmp_path / "seg" / "config.json"
    config.write_text(config.read_text().replace('"width": 64', '"width": "wide"'))
    with pytest.raises(ModelFileError, match="width must be a positive integer"):
        vitrim.load(tmp_path / "seg")


def test_a_detector_saves_and_reloads(tmp_path):
    torch.manual_seed(0)
    backbone = VisionTransformer(uniform_config(2, 32, 2, image_size=32, patch_size=4, in_chans=1, num_classes=1,
                                                mean=(0.5,), std=(0.5,)))
    model = DenseModel(backbone, DenseHeadConfig(num_classes=3, task="detect")).eval()
    x = torch.randn(2, 1, 32, 32)
    assert model(x).shape == (2, 3 + 4, 16, 16) and model.stride == 2.0
    vitrim.save(model, tmp_path / "det")
    again = vitrim.load(tmp_path / "det")
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)
    assert again.dense.task == "detect"


def test_a_detector_computes_only_the_pyramid_level_its_head_reads():
    torch.manual_seed(0)
    backbone = VisionTransformer(uniform_config(2, 32, 2, image_size=32, patch_size=4, in_chans=1, num_classes=1,
                                                mean=(0.5,), std=(0.5,)))
    model = DenseModel(backbone, DenseHeadConfig(num_classes=3, task="detect", scales=(1.0, 2.0, 0.5))).eval()
    x = torch.randn(2, 1, 32, 32)
    calls = []
    for i, level in enumerate(model.pyramid.levels):
        level.register_forward_hook(lambda *_, i=i: calls.append(i))
    with torch.no_grad():
        features = model.feature_map(x)
        every_level = model.head(model.pyramid(features), x.shape[-2:])
        calls.clear()
        torch.testing.assert_close(model(x), every_level, atol=0, rtol=0)
    assert calls == [1]  # scale 2: the finest
