"""timm adapter tests; they run in the separate timm environment (`make test` builds it)."""

import pytest
import timm
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer as TimmViT

import vitrim
from vitrim.adapters import from_canonical, metadata, to_canonical
from vitrim.data.dataset import ImageSet
from vitrim.errors import ConfigError

SMALL = dict(img_size=32, patch_size=8, in_chans=3, num_classes=5, embed_dim=48, depth=3, num_heads=3)
VARIANTS = {
    "vit": {},
    "layer-scale": dict(init_values=1e-2),
    "qk-norm": dict(qk_norm=True),
    "no-class-token": dict(class_token=False, global_pool="avg", fc_norm=True),
    "registers": dict(reg_tokens=4, no_embed_class=True),
    "avg-pool": dict(global_pool="avg"),
    "backbone": dict(num_classes=0),
}


def build(cls=TimmViT, **overrides):
    torch.manual_seed(0)
    model = cls(**{**SMALL, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def outputs(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("name", list(VARIANTS) + ["deit-distilled"])
def test_identity_through_canonical(name, images):
    model = build(VisionTransformerDistilled) if name == "deit-distilled" else build(**VARIANTS[name])
    canonical = to_canonical(model)
    if name == "backbone":
        torch.testing.assert_close(canonical.forward_features(images), model.forward_features(images), atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(outputs(canonical, images), outputs(model, images), atol=1e-5, rtol=1e-5)
    back = from_canonical(canonical, metadata(model))
    assert type(back) is type(model)
    torch.testing.assert_close(outputs(back, images), outputs(model, images), atol=1e-6, rtol=0)


def calibration(model, n=32):
    cfg = to_canonical(model).config
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    return ImageSet(images, torch.randint(0, max(cfg.num_classes, 2), (n,), generator=g),
                    [str(i) for i in range(cfg.num_classes)], cfg.mean, cfg.std)


@pytest.mark.parametrize("name", ["vit", "layer-scale", "qk-norm", "no-class-token", "registers"])
def test_prune_save_load_in_family(name, tmp_path, images):
    model = build(**VARIANTS[name])
    result = vitrim.prune(model, "flops=0.5", calibration(model), recover="reconstruct", calib_images=32,
                          round_to=4, progress=False)
    pruned = result.model
    assert type(pruned) is type(model) and 0.49 <= result.kept_ratio <= 0.5
    heads = [b.attn.num_heads for b in pruned.blocks if hasattr(b.attn, "num_heads")]
    assert all(b.attn.head_dim == 16 for b in pruned.blocks if hasattr(b.attn, "head_dim"))
    assert outputs(pruned, images).shape == (2, 5) and heads
    vitrim.save(pruned, tmp_path / "p")
    again = vitrim.load(tmp_path / "p")
    assert type(again) is type(pruned)
    assert torch.equal(outputs(again, images), outputs(pruned, images))


def test_pruning_nothing_is_identity(images):
    model = build(init_values=1e-2)
    result = vitrim.prune(model, "flops=1.0", calibration(model), recover="none", calib_images=16, progress=False)
    torch.testing.assert_close(outputs(result.model, images), outputs(model, images), atol=1e-6, rtol=0)


def test_unsupported_timm_models_are_named():
    with pytest.raises(ConfigError, match="global_pool='map'"):
        to_canonical(build(global_pool="map"))
    with pytest.raises(ConfigError, match="not a model vitrim knows"):
        vitrim.prune(timm.create_model("resnet18", pretrained=False), "flops=0.5", None)
