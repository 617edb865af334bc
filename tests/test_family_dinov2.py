"""The DINOv2 family: exact conversion both ways, pruning, token reduction, saving and export."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vitrim
from tests.test_surgery import random_plan
from vitrim.adapters import family_of
from vitrim.adapters.families import dinov2
from vitrim.adapters.hf_common import RemovedAttention, RemovedMlp, hf_metadata
from vitrim.bench.flops import model_cost
from vitrim.data.dataset import ImageSet
from vitrim.errors import ConfigError
from vitrim.prune.surgery import slice_model
from vitrim.tokens import reduce_tokens

IMAGE = 28


def tiny(hf_class: str, **overrides) -> torch.nn.Module:
    """A random DINOv2 of class ``hf_class`` whose norms, biases and layer scales are all non-trivial."""
    registers = "Registers" in hf_class
    config_class = transformers.Dinov2WithRegistersConfig if registers else transformers.Dinov2Config
    options = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2, image_size=IMAGE,
                   patch_size=7, layerscale_value=0.5, **({"num_register_tokens": 2} if registers else {}))
    if hf_class.endswith("ForImageClassification"):
        options["num_labels"] = 5
    options.update(overrides)
    torch.manual_seed(0)
    model = getattr(transformers, hf_class)(config_class(**options)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def hf_output(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def canonical_output(canonical, x: torch.Tensor, classifier: bool) -> torch.Tensor:
    return canonical(x) if classifier else canonical.forward_features(x)


CASES = [("Dinov2Model", {}), ("Dinov2ForImageClassification", {}), ("Dinov2Model", {"use_swiglu_ffn": True}),
         ("Dinov2WithRegistersModel", {}), ("Dinov2WithRegistersForImageClassification", {"use_swiglu_ffn": True})]
IDS = [f"{c}{'-swiglu' if o else ''}" for c, o in CASES]


@pytest.mark.parametrize("hf_class, overrides", CASES, ids=IDS)
def test_conversion_is_exact_both_ways(hf_class, overrides):
    model = tiny(hf_class, **overrides)
    classifier = hf_class.endswith("ForImageClassification")
    x = torch.randn(2, 3, IMAGE, IMAGE)
    canonical = vitrim.adapters.to_canonical(model)
    assert family_of(model) is not None and canonical.config.mlp_gated == bool(overrides)
    with torch.no_grad():
        expected = hf_output(model, x)
        torch.testing.assert_close(canonical_output(canonical, x, classifier), expected, atol=1e-5, rtol=0)
        if not classifier:  # the pooled embedding: the normalised class token
            torch.testing.assert_close(canonical.pooled(canonical.forward_features(x)), model(x).pooler_output,
                                       atol=1e-5, rtol=0)
        back = dinov2.from_canonical(canonical, hf_metadata(model))
        assert type(back) is type(model)
        torch.testing.assert_close(hf_output(back, x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("hf_class", ["Dinov2Model", "Dinov2WithRegistersModel"])
def test_position_embeddings_are_resized_like_dinov2(hf_class):
    """Stored for 28 px (4x4 patches), run at 42 px (6x6): bicubic, with antialiasing for the register model."""
    model = tiny(hf_class)
    canonical = dinov2.to_canonical(model, image_size=42)
    assert canonical.config.pos_embed_grid == 4 and canonical.config.grid_size == 6
    x = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        torch.testing.assert_close(canonical.forward_features(x), model(x).last_hidden_state, atol=1e-5, rtol=0)
        back = dinov2.from_canonical(canonical, hf_metadata(model))
        torch.testing.assert_close(back(x).last_hidden_state, model(x).last_hidden_state, atol=1e-5, rtol=0)


@pytest.mark.parametrize("hf_class, overrides", CASES, ids=IDS)
def test_a_pruned_canonical_model_converts_back(hf_class, overrides):
    """Whole heads, MLP units (gate/up pairs for SwiGLU), embedding channels and sub-layers."""
    model = tiny(hf_class, **overrides)
    canonical = dinov2.to_canonical(model)
    plan = random_plan(canonical.config, ["heads", "mlp", "embed", "attn_layer"], seed=1)
    plan.blocks[2].mlp_on = False
    pruned = slice_model(canonical, plan).eval()
    back = dinov2.from_canonical(pruned, hf_metadata(model))
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(hf_output(back, x), canonical_output(pruned, x, hf_class.endswith("Classification")),
                                   atol=1e-5, rtol=0)
    layer = dinov2._backbone(back).encoder.layer
    assert isinstance(layer[0].attention, RemovedAttention) and isinstance(layer[2].mlp, RemovedMlp)


def test_pruned_to_half_the_flops_reloads_in_its_class(tmp_path):
    model = tiny("Dinov2ForImageClassification", use_swiglu_ffn=True)
    images = torch.rand(16, 3, IMAGE, IMAGE)
    data = ImageSet(images=(images * 255).to(torch.uint8), labels=torch.arange(16) % 5,
                    class_names=[f"c{i}" for i in range(5)], mean=dinov2.IMAGENET_MEAN, std=dinov2.IMAGENET_STD)
    result = vitrim.prune(model, "flops=0.5", data=data, calib_images=16, batch_size=8, progress=False)
    pruned = result.model
    assert type(pruned) is type(model)
    dense_flops = model_cost(vitrim.adapters.to_canonical(model).config).flops
    assert model_cost(vitrim.adapters.to_canonical(pruned).config).flops <= 0.5 * dense_flops
    vitrim.save(pruned, tmp_path / "pruned")
    again = vitrim.load(tmp_path / "pruned")
    assert type(again) is type(model)
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, pruned(x).logits, atol=1e-6, rtol=0)


def test_a_save_pretrained_directory_loads_in_its_class(tmp_path):
    """Dense models round-trip through transformers' own files; per-layer widths need vitrim.save
    (one Dinov2Config cannot hold them, so from_pretrained of a pruned model is refused)."""
    model = tiny("Dinov2WithRegistersModel")
    model.save_pretrained(tmp_path / "hf")
    loaded = vitrim.load(tmp_path / "hf")
    x = torch.randn(1, 3, IMAGE, IMAGE)
    assert type(loaded) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).last_hidden_state, model(x).last_hidden_state, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["drop", "evit", "tome"])
def test_token_reduction_is_the_model_at_keep_1(method, tmp_path):
    model = tiny("Dinov2WithRegistersForImageClassification", use_swiglu_ffn=True)
    reduced = reduce_tokens(model, method, layers=(0, 1), keep=1.0)
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(reduced(x), model(x).logits, atol=1e-5, rtol=0)
        reduced.keep = 0.5
        out = reduced(x)
    assert out.shape == (2, 5) and reduced.last_token_counts[-1] < reduced.last_token_counts[0]
    from vitrim.quant.export import export

    result = export(reduced, tmp_path / "reduced.onnx", threads=1)
    assert result.check.passed and (tmp_path / "reduced.onnx").is_file()


def test_unsupported_activation_is_one_clear_error():
    model = tiny("Dinov2Model", hidden_act="relu")
    with pytest.raises(ConfigError, match="hidden_act 'relu' is not supported"):
        dinov2.to_canonical(model)
