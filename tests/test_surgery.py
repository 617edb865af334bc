import random

import pytest
import torch

import vitrim
from tests.conftest import uneven_config
from vitrim.models import VisionTransformer
from vitrim.prune.gates import gate_shapes, gated, plan_gates
from vitrim.prune.plan import BlockPlan, PrunePlan
from vitrim.prune.surgery import slice_model


def random_plan(cfg, kinds, seed=0):
    rng = random.Random(seed)
    plan = PrunePlan.keep_all(cfg)

    def sample(items, keep):
        return sorted(rng.sample(items, keep))

    if "embed" in kinds:
        plan.embed = sample(plan.embed, cfg.embed_dim - 5)
    for bp, d in zip(plan.blocks, cfg.blocks):
        if d.attention:
            if "heads" in kinds and d.heads > 1:
                bp.heads = sample(bp.heads, d.heads - 1)
            if "qk" in kinds and d.qk_dim > 1:
                bp.qk = [sample(list(range(d.qk_dim)), d.qk_dim - 2 if d.qk_dim > 2 else 1) for _ in bp.heads]
            else:
                bp.qk = [list(range(d.qk_dim)) for _ in bp.heads]
            if "v" in kinds and d.v_dim > 1:
                bp.v = [sample(list(range(d.v_dim)), d.v_dim - 1) for _ in bp.heads]
            else:
                bp.v = [list(range(d.v_dim)) for _ in bp.heads]
        if d.mlp and "mlp" in kinds:
            bp.mlp = sample(bp.mlp, d.mlp_dim // 2)
    if "attn_layer" in kinds:
        plan.blocks[0].attention = False
    if "mlp_layer" in kinds:
        plan.blocks[3].mlp_on = False
    return plan


KIND_SETS = [["heads"], ["qk"], ["v"], ["mlp"], ["embed"], ["attn_layer"], ["mlp_layer"],
             ["heads", "qk", "v", "mlp", "embed", "attn_layer", "mlp_layer"]]


@pytest.mark.parametrize("kinds", KIND_SETS, ids=["+".join(k) for k in KIND_SETS])
@pytest.mark.parametrize("variant", [{}, {"layer_scale_init": 0.5, "pool": "mean"}, {"qkv_bias": False},
                                     {"distill_token": True, "distill_head": True},
                                     {"reg_tokens": 3, "pos_embed_prefix": False, "qk_norm": True},
                                     {"class_token": False, "pool": "mean", "fc_norm": True},
                                     {"mlp_gated": True, "mlp_act": "silu", "pre_norm": True, "patch_bias": False,
                                      "head_bias": False, "pool": "cls_mean", "layer_scale_init": 1.0},
                                     {"class_token": False, "pool": "map", "pool_heads": 2, "pool_mlp_dim": 12,
                                      "mlp_act": "gelu_tanh", "pos_embed_grid": 6}])
def test_sliced_model_equals_gated_model(uneven_model, kinds, variant):
    torch.manual_seed(1)
    model = VisionTransformer(uneven_config(**variant)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if variant.get("qk_norm") and "qk" in kinds:
        kinds = [k for k in kinds if k != "qk"]  # q/k norm spans a head's channels: not prunable
    plan = random_plan(model.config, kinds)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad(), gated(model, plan_gates(model, plan)):
        expected = model(x)
    small = slice_model(model, plan)
    with torch.no_grad():
        got = small(x)
    assert (got - expected).abs().max().item() <= 1e-5
    if kinds:
        assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_keep_all_is_identity(uneven_model):
    plan = PrunePlan.keep_all(uneven_model.config)
    uneven_model.token_reduction = {"method": "tome", "layers": [0]}
    try:
        small = slice_model(uneven_model, plan)
    finally:
        uneven_model.token_reduction = None
    assert small.token_reduction == {"method": "tome", "layers": [0]}  # the tuned reduction carries over
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(small(x), uneven_model(x))
        with gated(uneven_model, plan_gates(uneven_model, plan)):
            torch.testing.assert_close(uneven_model(x), small(x), atol=1e-5, rtol=0)


def test_gates_at_one_are_identity(uneven_model):
    ones = {k: torch.ones(s) for k, s in gate_shapes(uneven_model.config).items()}
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        plain = uneven_model(x)
        with gated(uneven_model, ones):
            torch.testing.assert_close(uneven_model(x), plain, atol=1e-5, rtol=0)
        assert torch.equal(uneven_model(x), plain)  # hooks removed afterwards


def test_sliced_model_saves_and_reloads(uneven_model, tmp_path):
    plan = random_plan(uneven_model.config, KIND_SETS[-1])
    small = slice_model(uneven_model, plan)
    vitrim.save(small, tmp_path / "s")
    again = vitrim.load(tmp_path / "s")
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(again(x), small(x))
    assert again.config.blocks[0].attention is False
    assert again.config.blocks[1].attn_scale == 0.125


def test_uneven_head_channel_counts_are_rejected():
    with pytest.raises(Exception, match="same number of qk and v channels"):
        BlockPlan(heads=[0, 1], qk=[[0, 1], [0]], v=[[0], [0]], mlp=[0])
