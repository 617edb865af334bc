"""What the canonical ViT gained for DINOv2, CLIP and SigLIP: every lever still works on it."""

import pytest
import torch

from tests.conftest import uneven_config
from vitrim.models import VisionTransformer
from vitrim.models.tokens import TokenState
from vitrim.quant.errors import QuantConfigError

VARIANTS = {
    "swiglu": dict(mlp_gated=True, mlp_act="silu", pre_norm=True, patch_bias=False, head_bias=False, pool="cls_mean",
                   layer_scale_init=1.0, reg_tokens=2),
    "map": dict(class_token=False, pool="map", pool_heads=2, pool_mlp_dim=12, mlp_act="gelu_tanh", pos_embed_grid=6),
    "clip": dict(mlp_act="quick_gelu", pre_norm=True, fc_norm=True, patch_bias=False),
}


def build(name: str) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(uneven_config(**VARIANTS[name])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("name", list(VARIANTS))
def test_export_matches_pytorch(name, tmp_path):
    from vitrim.quant.export import export

    result = export(build(name), tmp_path / "m.onnx", threads=1, tolerance=1e-4)
    assert result.check.passed


@pytest.mark.parametrize("name", ["swiglu", "map"])
def test_blockwise_calibration_covers_the_new_layers(name, tmp_path):
    """The pooling head's layers are quantized in the last stage (they once were left out)."""
    from vitrim.quant.blockwise import BlockwiseConfig
    from vitrim.quant.quantize import quantize

    model = build(name)
    result = quantize(model, tmp_path / "q.onnx", "w8a8", calib=torch.randn(16, 1, 16, 16), threads=1,
                      calibrator="blockwise", blockwise=BlockwiseConfig(steps=2, search_images=8))
    assert result.check.top1_agreement >= 0.75


@pytest.mark.parametrize("name", list(VARIANTS))
def test_integer_only_names_what_it_does_not_cover(name):
    from vitrim.quant.intonly import int_only

    with pytest.raises(QuantConfigError, match="does not cover .*use --scheme w8a8"):
        int_only(build(name), torch.randn(4, 1, 16, 16))


def test_mean_and_attention_pooling_weigh_tokens_by_the_patches_they_stand_for():
    """Two identical tokens pool like one token of size 2, for the mean and for attention pooling."""
    for name, pool in (("clip", "cls_mean"), ("map", "map")):
        model = VisionTransformer(uneven_config(**{**VARIANTS[name], "pool": pool, "fc_norm": False,
                                                   **({"class_token": True} if pool == "cls_mean" else {})}))
        prefix = model.num_prefix_tokens
        tokens = torch.randn(2, prefix + 3, model.config.embed_dim)
        doubled = torch.cat([tokens, tokens[:, -1:]], dim=1)
        merged = TokenState(sizes=torch.tensor([[1.0] * (prefix + 2) + [2.0]] * 2), weighted=True)
        with torch.no_grad():
            torch.testing.assert_close(model.pool(tokens, merged), model.pool(doubled), atol=1e-5, rtol=0)


def test_gated_mlp_unit_owns_two_rows():
    from vitrim.prune.plan import PrunePlan
    from vitrim.prune.surgery import slice_model

    model = build("swiglu")
    plan = PrunePlan.keep_all(model.config)
    plan.blocks[0].mlp = [0, 5, 7]
    pruned = slice_model(model, plan)
    fc1 = model.blocks[0].mlp.fc1.weight
    M = model.config.blocks[0].mlp_dim
    torch.testing.assert_close(pruned.blocks[0].mlp.fc1.weight, fc1[[0, 5, 7, M, M + 5, M + 7]])
