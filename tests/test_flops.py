import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import uneven_config
from vitrim.bench.flops import cost_breakdown, model_cost
from vitrim.models import VisionTransformer, get_preset


def counted_flops(model, batch=1):
    cfg = model.config
    x = torch.randn(batch, cfg.in_chans, cfg.image_size, cfg.image_size)
    # The math attention path runs q.k^T and attention.v as bmm, which FlopCounterMode counts.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("cfg", [
    uneven_config(),
    uneven_config(pool="mean", class_token=False, layer_scale_init=0.1, qkv_bias=False),
    uneven_config(distill_token=True, distill_head=True),
    uneven_config(reg_tokens=4, qk_norm=True, layer_scale_init=1e-2),
    uneven_config(class_token=False, pool="mean", fc_norm=True, pos_embed_prefix=False, reg_tokens=2),
    uneven_config(mlp_gated=True, mlp_act="silu", pre_norm=True, patch_bias=False, head_bias=False, pool="cls_mean",
                  layer_scale_init=1.0, reg_tokens=2),
    uneven_config(class_token=False, pool="map", pool_heads=2, pool_mlp_dim=12, mlp_act="gelu_tanh"),
    uneven_config(class_token=False, pool="map", pool_heads=3, pool_mlp_dim=10, mlp_gated=True, pool_dim=12),
    uneven_config(pos_embed_grid=6, mlp_act="quick_gelu", pre_norm=True),
    get_preset("fmnist-vit").build(),
    get_preset("fmnist-vit-micro").build(),
])
def test_analytic_counts_match_torch(cfg):
    model = VisionTransformer(cfg)
    cost = model_cost(cfg)
    assert cost.params == sum(p.numel() for p in model.parameters())
    assert cost.flops == counted_flops(model)
    assert 3 * cost.flops == counted_flops(model, batch=3)


def test_breakdown_covers_every_component():
    parts = cost_breakdown(uneven_config())
    assert list(parts)[0] == "embedding" and list(parts)[-1] == "head"
    assert parts["block2.attention"].flops == 0 and parts["block1.mlp"].params == 0
    assert len(parts) == 2 + 2 * 4
