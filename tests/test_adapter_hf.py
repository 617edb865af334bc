import pytest
import torch
import transformers

import vitrim
from tests.test_prune import random_set
from vitrim.adapters.hf import from_canonical, hf_metadata, to_canonical
from vitrim.errors import ConfigError
from vitrim.models import BlockDims


def hf_model(cls="ViTForImageClassification", **overrides):
    settings = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=48, num_hidden_layers=3,
                    num_attention_heads=3, intermediate_size=96, num_labels=5)
    config_class = transformers.DeiTConfig if cls.startswith("DeiT") else transformers.ViTConfig
    cfg = config_class(**{**settings, **overrides})
    torch.manual_seed(0)
    model_class = getattr(transformers, cls)
    model = model_class(cfg, add_pooling_layer=False) if cls.endswith("Model") else model_class(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def logits(model, x):
    with torch.no_grad():
        out = model(pixel_values=x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


FAMILY_CLASSES = ["ViTForImageClassification", "ViTModel", "DeiTForImageClassification",
                  "DeiTForImageClassificationWithTeacher", "DeiTModel"]


@pytest.mark.parametrize("cls", FAMILY_CLASSES)
def test_round_trip_through_canonical_is_exact(cls, images):
    model = hf_model(cls)
    canonical = to_canonical(model)
    if not cls.endswith("Model"):
        torch.testing.assert_close(canonical(images), logits(model, images), atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(canonical.forward_features(images), logits(model, images), atol=1e-5, rtol=1e-5)
    meta = hf_metadata(model)
    back = from_canonical(canonical, meta["hf_class"], meta["hf_config"])
    assert type(back) is type(model)
    torch.testing.assert_close(logits(back, images), logits(model, images), atol=1e-6, rtol=0)


def test_per_layer_dims_and_removed_sublayers_survive(images):
    canonical = to_canonical(hf_model())
    plan_cfg = canonical.config.replace(blocks=[
        {"heads": 2, "qk_dim": 16, "v_dim": 16, "mlp_dim": 40, "attn_scale": 0.25},
        {"heads": 0, "qk_dim": 0, "v_dim": 0, "mlp_dim": 96, "attention": False},
        {"heads": 3, "qk_dim": 8, "v_dim": 8, "mlp_dim": 0, "mlp": False, "attn_scale": 0.25}])
    small = vitrim.create(plan_cfg, seed=1)
    with torch.no_grad():
        for p in small.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    meta = hf_metadata(hf_model())
    hf = from_canonical(small, meta["hf_class"], meta["hf_config"])
    torch.testing.assert_close(logits(hf, images), small(images).detach(), atol=1e-5, rtol=1e-5)
    assert [layer.attention.q_proj.out_features if hasattr(layer.attention, "q_proj") else 0
            for layer in hf.vit.layers] == [32, 0, 24]


def test_mismatched_qk_and_v_dims_are_refused():
    canonical = to_canonical(hf_model())
    cfg = canonical.config.replace(blocks=[{"heads": 3, "qk_dim": 8, "v_dim": 16, "mlp_dim": 96}] * 3)
    meta = hf_metadata(hf_model())
    with pytest.raises(ConfigError, match="one head_dim for queries, keys and values"):
        from_canonical(vitrim.create(cfg), meta["hf_class"], meta["hf_config"])


@pytest.mark.parametrize("cls", ["ViTForImageClassification", "DeiTForImageClassificationWithTeacher"])
def test_prune_save_load_hf_model(tmp_path, images, cls):
    model = hf_model(cls)
    data = random_set(to_canonical(model).config, n=32)
    result = vitrim.prune(model, "flops=0.5", data, recover="reconstruct", calib_images=32, round_to=4, progress=False)
    pruned = result.model
    assert type(pruned).__name__ == cls
    assert 0.49 <= result.kept_ratio <= 0.5
    assert all(isinstance(b, BlockDims) and b.qk_dim in (0, 16) for b in to_canonical(pruned).config.blocks)
    vitrim.save(pruned, tmp_path / "p")
    again = vitrim.load(tmp_path / "p")
    assert type(again) is type(pruned)
    assert torch.equal(logits(again, images), logits(pruned, images))


def test_unsupported_models_are_named():
    with pytest.raises(ConfigError, match="not a supported Hugging Face ViT"):
        to_canonical(torch.nn.Conv2d(3, 3, 3))
    with pytest.raises(ConfigError, match="hidden_act"):
        to_canonical(hf_model(hidden_act="relu"))


def test_cli_prunes_a_saved_hf_model_in_its_family(capsys, tmp_path):
    import json

    from tests.test_cli import run
    from tests.test_data import write_idx_dir

    write_idx_dir(tmp_path / "data", n_train=48, n_test=8, size=32)
    model = hf_model(num_labels=3, num_channels=1)
    vitrim.save(model, tmp_path / "hf")
    out = tmp_path / "pruned"
    code, stdout, err = run(capsys, "prune", str(tmp_path / "hf"), "--data", f"idx:{tmp_path / 'data'}", "--calib", "32",
                            "--round-to", "4", "--runs", "2", "--out", str(out), "--json")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["family"] == "hf"
    assert type(vitrim.load(out)).__name__ == "ViTForImageClassification"
    code, stdout, err = run(capsys, "eval", str(out), "--data", f"idx:{tmp_path / 'data'}", "--json")
    assert code == 0 and json.loads(stdout)["count"] == 8
