"""The hf-siglip family: SiglipVisionModel (with and without its pooling head) <-> the canonical ViT."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from tests.test_family_clip import (KIND_SETS, TOL, assert_outputs_close, check_export, check_round_trip,  # noqa: E402
                                    check_pruned_to_half, check_save_load, check_save_pretrained, images, perturbed,
                                    pruned_back)
from vitrim.adapters import family_of, head_kind, prunable, to_canonical  # noqa: E402
from vitrim.adapters.families.siglip import PoolingAttention  # noqa: E402
from vitrim.adapters.registry import get_family  # noqa: E402
from vitrim.errors import ConfigError  # noqa: E402
from vitrim.tokens import reduce_tokens  # noqa: E402

SIZE = 32
HEADS = [True, False]  # vision_use_head
HEAD_IDS = ["head", "no-head"]


def siglip_model(use_head=True, **overrides):
    cfg = transformers.SiglipVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, image_size=SIZE, patch_size=8,
                                          vision_use_head=use_head, **overrides)
    torch.manual_seed(0)
    return perturbed(transformers.SiglipVisionModel(cfg))


def hf_outputs(model, x):
    """``{name: tensor}`` of what the SigLIP model outputs (``pooler_output`` only with a head)."""
    with torch.no_grad():
        out = model(pixel_values=x)
    outputs = {"last_hidden_state": out.last_hidden_state}
    if out.pooler_output is not None:
        outputs["pooler_output"] = out.pooler_output
    return outputs


def canonical_outputs(canonical, x):
    """The canonical equivalents of :func:`hf_outputs`."""
    with torch.no_grad():
        tokens = canonical.forward_features(x)  # (B, P, C), post-normed
        outputs = {"last_hidden_state": tokens}
        if canonical.config.pool == "map":
            outputs["pooler_output"] = canonical.pooled(tokens)
        return outputs


@pytest.mark.parametrize("use_head", HEADS, ids=HEAD_IDS)
def test_family_is_registered(use_head):
    model = siglip_model(use_head)
    assert family_of(model) == "hf-siglip" and head_kind(model) == "none"
    assert set(prunable(model)) == {"heads", "mlp", "embed", "attn_layer", "mlp_layer"}
    family = get_family("hf-siglip")
    assert family.hf_classes == ("SiglipVisionModel",) and family.hf_model_types == ("siglip_vision_model",)
    assert family.hf_infer_class(model.config.to_dict(), list(model.state_dict())) == "SiglipVisionModel"
    family.hf_check_config(model.config.to_dict(), "config.json")


@pytest.mark.parametrize("use_head", HEADS, ids=HEAD_IDS)
def test_identity_conversion(use_head):
    model = siglip_model(use_head)
    canonical = to_canonical(model)
    cfg = canonical.config
    assert not cfg.class_token and cfg.num_tokens == (SIZE // 8) ** 2 and cfg.mlp_act == "gelu_tanh"
    assert cfg.pool == ("map" if use_head else "mean") and not cfg.fc_norm and cfg.mean == (0.5, 0.5, 0.5)
    if use_head:
        assert (cfg.pool_heads, cfg.pool_dim, cfg.pool_mlp_dim) == (2, 32, 64)
    x = images()
    expected = hf_outputs(model, x)
    assert ("pooler_output" in expected) == use_head
    assert_outputs_close(canonical_outputs(canonical, x), expected)


@pytest.mark.parametrize("use_head", HEADS, ids=HEAD_IDS)
def test_round_trip_is_identical(use_head):
    back = check_round_trip(siglip_model(use_head))
    assert back.config.vision_use_head == use_head
    if use_head:
        assert isinstance(back.head.attention, torch.nn.MultiheadAttention)  # same width: HF's own module


@pytest.mark.parametrize("kinds", KIND_SETS, ids=["+".join(k) for k in KIND_SETS])
@pytest.mark.parametrize("use_head", HEADS, ids=HEAD_IDS)
def test_pruned_model_converts_back(use_head, kinds):
    small, back = pruned_back(siglip_model(use_head), kinds)
    if use_head:  # the pooling attention keeps its width: HF's module only while it equals the embedding's
        assert isinstance(back.head.attention, PoolingAttention) == ("embed" in kinds)
    x = images()
    assert_outputs_close(hf_outputs(back, x), canonical_outputs(small, x))


@pytest.mark.parametrize("use_head", HEADS, ids=HEAD_IDS)
def test_token_reduction(use_head):
    model = siglip_model(use_head)
    canonical = to_canonical(model)
    x = images()
    full = reduce_tokens(model, "tome", keep=1.0)
    with torch.no_grad():
        tokens, state = full.forward_features(x)
        got = {"last_hidden_state": tokens}
        if use_head:
            got["pooler_output"] = full.model.pooled(tokens, state)
        assert_outputs_close(got, hf_outputs(model, x))
        assert (full(x) - canonical(x)).abs().max().item() <= TOL
    half = reduce_tokens(model, "tome", keep=0.5)
    with torch.no_grad():
        tokens, state = half.forward_features(x)  # the attention pool reads the merged tokens
        pooled = half.model.pooled(tokens, state)
    assert tokens.shape[0] == 3 and tokens.shape[1] < canonical.config.num_tokens and tokens.shape[2] == 32
    assert pooled.shape == (3, 32) and torch.isfinite(pooled).all()
    if use_head:
        assert (pooled - hf_outputs(model, x)["pooler_output"]).abs().max() > 1e-4  # it pooled other tokens
    for method in ("drop", "evit"):  # they score tokens by a class token SigLIP lacks
        with pytest.raises(ConfigError, match="no class token; use method='tome'"):
            reduce_tokens(model, method, keep=0.5)


@pytest.mark.parametrize("use_head", HEADS, ids=HEAD_IDS)
def test_onnx_export_of_reduced_model(tmp_path, use_head):
    reduced = reduce_tokens(siglip_model(use_head), "tome", keep=0.5)
    with torch.no_grad():  # a zero placeholder head: give the check something to compare
        reduced.model.head.weight.normal_()
    check_export(reduced, tmp_path)


def test_unsupported_activation_is_one_clear_error():
    model = siglip_model(hidden_act="relu")
    with pytest.raises(ConfigError, match="SigLIP hidden_act 'relu' is not supported .*gelu_pytorch_tanh"):
        to_canonical(model)


@pytest.mark.parametrize("use_head", HEADS, ids=HEAD_IDS)
def test_pruned_model_saves_and_loads_in_its_class(tmp_path, use_head):
    check_save_load(siglip_model(use_head), tmp_path, hf_outputs)


@pytest.mark.parametrize("use_head", HEADS, ids=HEAD_IDS)
def test_save_pretrained_directory_loads(tmp_path, use_head):
    check_save_pretrained(siglip_model(use_head), tmp_path, hf_outputs)


@pytest.mark.parametrize("use_head", HEADS, ids=HEAD_IDS)
def test_pruned_to_half_the_flops_reloads_in_its_class(use_head, tmp_path):
    check_pruned_to_half(siglip_model(use_head), tmp_path, hf_outputs)
