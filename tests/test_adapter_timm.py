"""timm adapter tests; they run in the separate timm environment (`make test` builds it)."""

import pytest
import timm
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer as TimmViT

import vitrim
from vitrim.adapters import from_canonical, metadata, to_canonical
from vitrim.data.dataset import ImageSet
from vitrim.errors import ConfigError, ModelFileError

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


def small_deit(**overrides):
    """timm's deit_small_patch16_224 entry point at a tiny size: it carries timm's pretrained_cfg."""
    torch.manual_seed(0)
    return timm.create_model("deit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                             depth=3, num_heads=3, num_classes=5, **overrides).eval()


def test_timm_spec_builds_timm_model(images):
    model = vitrim.load("timm:vit_tiny_patch16_224")
    assert type(model) is TimmViT and not model.training
    assert model.pretrained_cfg["architecture"] == "vit_tiny_patch16_224"
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(outputs(to_canonical(model), x), outputs(model, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec, pretrained, error, message", [
    ("timm:test_resnet", False, ConfigError, r"timm:test_resnet \(ResNet\) is not a model vitrim knows; supported: "
                                             r".*Hugging Face ViT/DeiT.*timm VisionTransformer"),
    ("timm:no_such_net", False, ConfigError, "timm has no model 'no_such_net'"),
    ("timm:test_vit", False, ConfigError, "timm:test_vit: .*dynamic_img_size=True"),
    ("timm:deit_tiny_patch16_224", True, ModelFileError, "could not fetch pretrained weights for "
                                                         "timm:deit_tiny_patch16_224 .*leave out --pretrained"),
])
def test_timm_spec_errors(spec, pretrained, error, message):
    with pytest.raises(error, match=message):
        vitrim.load(spec, pretrained=pretrained)


def test_pretrained_cfg_survives_pruning_and_reload(tmp_path):
    model = small_deit()
    result = vitrim.prune(model, "flops=0.5", calibration(model, 16), calib_images=16, round_to=4, progress=False)
    vitrim.save(result.model, tmp_path / "p")
    again = vitrim.load(tmp_path / "p")
    for key in ("mean", "std", "interpolation", "crop_pct", "architecture"):
        assert again.pretrained_cfg[key] == model.pretrained_cfg[key]
    assert to_canonical(again).config.mean == (0.485, 0.456, 0.406)


def test_backbone_without_head_prunes_by_its_features():
    model = build(num_classes=0)
    with pytest.raises(ConfigError, match="no head .*objective='features'"):
        vitrim.prune(model, "flops=0.6", calibration(model, 8), objective="labels", calib_images=8, progress=False)
    result = vitrim.prune(model, "flops=0.6", calibration(model, 8), calib_images=8, round_to=4, progress=False)
    assert type(result.model) is type(model) and result.kept_ratio <= 0.6 and result.config.objective == "features"


def test_cli_prune_keeps_the_timm_family(capsys, tmp_path, images):
    import json

    from tests.test_cli import run
    from vitrim.adapters.random_data import pseudo_labelled
    from vitrim.prune import PruneConfig

    vitrim.save(small_deit(), tmp_path / "deit")
    out = tmp_path / "pruned"
    code, stdout, err = run(capsys, "prune", str(tmp_path / "deit"), "--data", "random", "--calib", "16",
                            "--steps", "2", "--round-to", "4", "--runs", "2", "--out", str(out), "--json")
    assert code == 0, err
    assert json.loads(stdout)["family"] == "timm"
    assert json.loads((out / "config.json").read_text())["family"] == "timm"
    pruned = vitrim.load(out)
    assert type(pruned) is TimmViT
    model = vitrim.load(tmp_path / "deit")
    cfg = PruneConfig(target="flops=0.5", calib_images=16, steps=2, round_to=4)
    expected = vitrim.prune(model, config=cfg, data=pseudo_labelled(to_canonical(model), 16), progress=False).model
    torch.testing.assert_close(outputs(pruned, images), outputs(expected, images), atol=1e-5, rtol=0)


def test_cli_measures_timm_specs(capsys):
    import json

    from tests.test_cli import run

    code, stdout, err = run(capsys, "bench", "timm:vit_tiny_patch16_224", "--batch", "1", "--runs", "1", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["weights"] == "random" and result["params"] == 5_717_416
    code, stdout, err = run(capsys, "analyze", "timm:vit_tiny_patch16_224", "--runs", "1", "--json")
    assert code == 0 and len(json.loads(stdout)["components"]) == 2 + 2 * 12
    code, stdout, err = run(capsys, "eval", "timm:vit_tiny_patch16_224")
    assert code == 2 and stdout == "" and "random weights here; add --pretrained" in err
    code, stdout, err = run(capsys, "bench", "timm:test_resnet")
    assert code == 2 and stdout == "" and err.count("\n") == 1 and "not a model vitrim knows" in err
