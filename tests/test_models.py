import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import uneven_config
from vitrim.errors import ConfigError, DataError
from vitrim.models import BlockDims, ViTConfig, VisionTransformer, get_preset, uniform_config
from vitrim.models.config import uniform_config as uc


def reference_attention(attn, x):
    """Attention written out by hand (softmax(q k^T * scale) v) to check the fused path."""
    q, k, v = attn.split_qkv(x)
    weights = torch.softmax(q @ k.transpose(-2, -1) * attn.scale, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    return attn.proj(out)


def test_uneven_blocks_have_their_own_dims(uneven_model):
    blocks = uneven_model.blocks
    assert blocks[0].attn.qkv.out_features == 3 * (2 * 8 + 12)
    assert blocks[0].attn.proj.in_features == 36
    assert blocks[1].mlp is None and blocks[1].norm2 is None
    assert blocks[2].attn is None and blocks[2].norm1 is None
    assert blocks[3].mlp.fc1.out_features == 9
    assert blocks[1].attn.scale == 0.125
    assert blocks[3].attn.scale == pytest.approx(5**-0.5)


def test_fused_attention_matches_reference(uneven_model):
    x = torch.randn(2, 17, 24)
    for block in uneven_model.blocks:
        if block.attn is not None:
            torch.testing.assert_close(block.attn(x), reference_attention(block.attn, x), atol=1e-5, rtol=1e-5)


def test_forward_shapes_and_pooling():
    model = VisionTransformer(uneven_config(pool="mean", class_token=False)).eval()
    assert model.forward_features(torch.randn(3, 1, 16, 16)).shape == (3, 16, 24)
    assert model(torch.randn(3, 1, 16, 16)).shape == (3, 5)


def test_distillation_head_averages_both_tokens():
    torch.manual_seed(0)
    model = VisionTransformer(uneven_config(distill_token=True, distill_head=True)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        tokens = model.forward_features(torch.randn(2, 1, 16, 16))
        assert tokens.shape[1] == 16 + 2
        expected = (model.head(tokens[:, 0]) + model.head_dist(tokens[:, 1])) / 2
        torch.testing.assert_close(model.classify(tokens), expected)


def test_removed_sublayer_is_identity(uneven_model):
    x = torch.randn(2, 17, 24)
    block = uneven_model.blocks[2]  # attention removed
    torch.testing.assert_close(block(x), x + block.mlp_branch(x))


def test_uneven_model_trains():
    torch.manual_seed(0)
    model = VisionTransformer(uneven_config())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = torch.randn(16, 1, 16, 16), torch.randint(0, 5, (16,))
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_wrong_input_shape_is_reported(uneven_model):
    with pytest.raises(DataError, match=r"\(B, 1, 16, 16\).*got \(2, 3, 16, 16\)"):
        uneven_model(torch.randn(2, 3, 16, 16))
    with pytest.raises(DataError, match="resize"):
        uneven_model(torch.randn(2, 1, 28, 28))


@pytest.mark.parametrize("bad, message", [
    (dict(image_size=30), "not divisible"),
    (dict(blocks=[]), "at least one block"),
    (dict(pool="max"), "pool must be"),
    (dict(class_token=False), "needs class_token"),
    (dict(mean=(0.5, 0.5)), "one per input channel"),
    (dict(num_classes=0), "num_classes must be a positive integer"),
    (dict(class_names=["a"]), "class_names has 1 entries"),
    (dict(distill_head=True), "distill_head needs distill_token"),
    (dict(distill_token=True, class_token=False, pool="mean"), "distill_token needs class_token"),
])
def test_invalid_configs_are_rejected(bad, message):
    with pytest.raises(ConfigError, match=message):
        uneven_config(**bad)


def test_invalid_block_dims_are_rejected():
    with pytest.raises(ConfigError, match="heads=0.*attention=false"):
        BlockDims(heads=0, qk_dim=8, v_dim=8, mlp_dim=8)
    with pytest.raises(ConfigError, match="mlp=false"):
        BlockDims(heads=1, qk_dim=8, v_dim=8, mlp_dim=0)
    with pytest.raises(ConfigError, match="attn_scale"):
        BlockDims(heads=1, qk_dim=8, v_dim=8, mlp_dim=8, attn_scale=math.nan)
    removed = BlockDims(heads=4, qk_dim=8, v_dim=8, mlp_dim=8, attention=False)
    assert (removed.heads, removed.qk_dim, removed.v_dim) == (0, 0, 0)


def test_config_round_trips_through_dict():
    cfg = uneven_config()
    again = ViTConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ConfigError, match="unknown ViT config keys: colour"):
        ViTConfig.from_dict({**cfg.to_dict(), "colour": 1})


def test_presets_build_expected_shapes():
    ref = get_preset("fmnist-vit").build()
    assert (ref.embed_dim, ref.depth, ref.num_tokens) == (192, 6, 50)
    assert all(b.heads == 3 and b.qk_dim == 64 and b.mlp_dim == 768 for b in ref.blocks)
    base = get_preset("vit-base").build()
    params = sum(p.numel() for p in VisionTransformer(base).parameters())
    assert params == pytest.approx(86.57e6, rel=1e-3)


def test_uniform_config_checks_divisibility():
    with pytest.raises(ConfigError, match="not divisible by heads"):
        uc(2, 100, 3)
    assert uniform_config(1, 96, 3, head_dim=16).blocks[0].qk_dim == 16


def test_a_model_at_another_image_size_keeps_its_weights():
    """Same weights, position rows resampled: at the original size it is the model itself."""
    from vitrim.models.resize import with_image_size

    torch.manual_seed(0)
    model = VisionTransformer(uniform_config(2, 32, 2, image_size=16, patch_size=4, in_chans=1, num_classes=3,
                                             mean=(0.5,), std=(0.5,))).eval()
    same = with_image_size(model, 16)
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(same(x), model(x), atol=0, rtol=0)
    big = with_image_size(model, 32)
    assert big.config.num_tokens == 65 and big.config.pos_embed_grid is None
    # the stored rows are what the interpolating canonical model computes on the fly
    interpolating = VisionTransformer(model.config.replace(image_size=32, pos_embed_grid=4)).eval()
    interpolating.load_state_dict(model.state_dict())
    y = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(big(y), interpolating(y), atol=1e-6, rtol=0)
    torch.testing.assert_close(big.pos_embed[:, :1], model.pos_embed[:, :1])  # the class token's row stays
    with pytest.raises(ConfigError, match="not a multiple of the patch size 4; use 28 or 32"):
        with_image_size(model, 30)


def test_a_teacher_sees_its_own_input_size():
    from vitrim.models.resize import InputResized

    torch.manual_seed(0)
    model = VisionTransformer(uniform_config(2, 32, 2, image_size=16, patch_size=4, in_chans=1, num_classes=3,
                                             mean=(0.5,), std=(0.5,))).eval()
    small = torch.randn(2, 1, 16, 16)
    big = F.interpolate(small, size=(32, 32), mode="nearest")  # every pixel doubled
    teacher = InputResized(model)
    torch.testing.assert_close(teacher(small), model(small), atol=0, rtol=0)
    assert teacher(big).shape == (2, 3) and teacher.config is model.config
