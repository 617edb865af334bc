import numpy as np
import pytest
import torch
import transformers

import vitrim
from tests.test_prune import random_set
from vitrim.adapters import head_kind
from vitrim.adapters.families.hf_vit import from_canonical, hf_metadata, to_canonical
from vitrim.errors import ConfigError, ModelFileError
from vitrim.models import BlockDims


def hf_model(cls="ViTForImageClassification", pooler=False, **overrides):
    settings = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=48, num_hidden_layers=3,
                    num_attention_heads=3, intermediate_size=96, num_labels=5)
    config_class = transformers.DeiTConfig if cls.startswith("DeiT") else transformers.ViTConfig
    cfg = config_class(**{**settings, **overrides})
    torch.manual_seed(0)
    model_class = getattr(transformers, cls)
    model = model_class(cfg, add_pooling_layer=pooler) if cls.endswith("Model") else model_class(cfg)
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


# --- the pooler of ViTModel / DeiTModel -------------------------------------------------------

@pytest.mark.parametrize("cls", ["ViTModel", "DeiTModel"])
def test_pooler_is_the_canonical_head(cls, images):
    model = hf_model(cls, pooler=True, pooler_output_size=20)
    canonical = to_canonical(model)
    with torch.no_grad():
        out = model(pixel_values=images)
        torch.testing.assert_close(canonical(images).tanh(), out.pooler_output, atol=1e-6, rtol=0)
        torch.testing.assert_close(canonical.forward_features(images), out.last_hidden_state, atol=1e-6, rtol=0)
        back = from_canonical(canonical, hf_metadata(model)["hf_class"], hf_metadata(model)["hf_config"], pooler=True)
        assert torch.equal(back(pixel_values=images).pooler_output, out.pooler_output)
    assert head_kind(model) == "pooler" and head_kind(hf_model(cls)) == "none"


def test_pooler_follows_the_pruned_embedding_channels(tmp_path, images):
    model = hf_model("ViTModel", pooler=True, pooler_output_size=20)
    data = random_set(to_canonical(model).config, n=16)
    result = vitrim.prune(model, "flops=0.7", data, recover="none", structures="embed", calib_images=16,
                          round_to=4, steps=1, progress=False)
    pruned = result.model
    width = pruned.config.hidden_size
    assert type(pruned).__name__ == "ViTModel" and width < 48
    assert (pruned.pooler.dense.in_features, pruned.pooler.dense.out_features) == (width, 20)
    # the kept channels, read off the (unchanged, recover="none") patch embedding rows
    old_rows = model.embeddings.patch_embeddings.projection.weight.flatten(1)
    new_rows = pruned.embeddings.patch_embeddings.projection.weight.flatten(1)
    kept = [int((old_rows == row).all(dim=1).nonzero()) for row in new_rows]
    assert torch.equal(pruned.pooler.dense.weight, model.pooler.dense.weight[:, kept])
    with torch.no_grad():
        pooled = pruned(pixel_values=images).pooler_output
        torch.testing.assert_close(pooled, to_canonical(pruned)(images).tanh(), atol=1e-6, rtol=0)
    vitrim.save(pruned, tmp_path / "p")
    again = vitrim.load(tmp_path / "p")
    assert again.pooler is not None
    with torch.no_grad():
        assert torch.equal(again(pixel_values=images).pooler_output, pooled)


def test_backbone_without_head_prunes_by_its_features():
    """No classifier: labels mean nothing, so 'auto' prunes by the distance to the dense features."""
    model = hf_model("ViTModel")
    data = random_set(to_canonical(model).config, n=8, classes=1)
    with pytest.raises(ConfigError, match="no head .*objective='features'"):
        vitrim.prune(model, "flops=0.6", data, objective="labels", calib_images=8, progress=False)
    result = vitrim.prune(model, "flops=0.6", data, calib_images=8, round_to=4, progress=False)
    assert type(result.model).__name__ == "ViTModel" and result.kept_ratio <= 0.6
    assert result.config.objective == "features" and result.model.config.hidden_size == model.config.hidden_size


# --- Hugging Face directories (save_pretrained) ------------------------------------------------

def saved_pretrained(model, directory):
    from transformers.utils import logging

    logging.disable_progress_bar()
    model.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("cls, pooler", [("ViTForImageClassification", False), ("DeiTForImageClassificationWithTeacher", False),
                                         ("ViTModel", True), ("DeiTModel", False)])
def test_load_save_pretrained_directory(tmp_path, images, cls, pooler):
    model = hf_model(cls, pooler=pooler)
    saved_pretrained(model, tmp_path / "hf")
    for spec in (tmp_path / "hf", f"hf:{tmp_path / 'hf'}"):
        loaded = vitrim.load(spec)
        assert type(loaded) is type(model) and not loaded.training
        assert (getattr(loaded, "pooler", None) is not None) == pooler  # never a randomly initialised pooler
        torch.testing.assert_close(logits(loaded, images), logits(model, images), atol=0, rtol=0)


def test_pruned_config_describes_uniform_plans_for_save_pretrained(tmp_path, images):
    model = hf_model()
    data = random_set(to_canonical(model).config, n=16)
    uniform = vitrim.prune(model, "flops=0.7", data, structures="embed", calib_images=16, round_to=4,
                           progress=False).model
    assert uniform.config.hidden_size < 48 and uniform.config.head_dim == 16
    saved_pretrained(uniform, tmp_path / "uniform")
    plain = transformers.ViTForImageClassification.from_pretrained(tmp_path / "uniform", use_safetensors=True)
    assert torch.equal(logits(plain.eval(), images), logits(uniform, images))

    uneven = vitrim.prune(model, "flops=0.5", data, calib_images=16, round_to=4, progress=False).model
    assert len({layer.mlp.fc1.out_features for layer in uneven.vit.layers if hasattr(layer.mlp, "fc1")}) > 1
    saved_pretrained(uneven, tmp_path / "uneven")
    with pytest.raises(ModelFileError, match="do not match config.json .*save it with vitrim.save"):
        vitrim.load(tmp_path / "uneven")


def test_broken_hf_directories_are_named(tmp_path):
    import json

    good = saved_pretrained(hf_model(), tmp_path / "good")
    config = json.loads((good / "config.json").read_text())

    def variant(name, config_text=None, drop=None):
        import shutil

        directory = tmp_path / name
        shutil.copytree(good, directory)
        if config_text is not None:
            (directory / "config.json").write_text(config_text)
        if drop:
            (directory / drop).unlink()
        return directory

    cases = [
        (variant("no-config", drop="config.json"), r"has no config\.json"),
        (variant("bad-json", config_text="{oops"), "not valid JSON"),
        (variant("wider", json.dumps({**config, "hidden_size": 60})), "do not match config.json .*mismatched"),
        (variant("deeper", json.dumps({**config, "num_hidden_layers": 4})), "do not match config.json .*missing"),
        (variant("backbone", json.dumps({**config, "architectures": ["ViTModel"]})), "unexpected classifier"),
        (variant("no-weights", drop="model.safetensors"), r"has no model\.safetensors"),
    ]
    for directory, message in cases:
        with pytest.raises(ModelFileError, match=message):
            vitrim.load(directory)
    pickled = variant("pickled", drop="model.safetensors")
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ModelFileError, match="pytorch_model.bin, a pickle file vitrim does not load"):
        vitrim.load(pickled)
    with pytest.raises(ModelFileError, match="does not exist"):
        vitrim.load(f"hf:{tmp_path / 'nowhere'}")


def test_models_vitrim_does_not_know_list_the_families(tmp_path):
    resnet = transformers.ResNetForImageClassification(
        transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1], num_labels=3))
    saved_pretrained(resnet, tmp_path / "resnet")
    with pytest.raises(ConfigError, match="ResNetForImageClassification.*not a model vitrim knows; supported: "
                                          ".*Hugging Face ViT/DeiT.*timm VisionTransformer"):
        vitrim.load(tmp_path / "resnet")
    masked = transformers.ViTForMaskedImageModeling(hf_model().config)
    saved_pretrained(masked, tmp_path / "masked")
    with pytest.raises(ConfigError, match="ViTForMaskedImageModeling.*not a model vitrim knows"):
        vitrim.load(f"hf:{tmp_path / 'masked'}")


# --- the command line on Hugging Face directories ----------------------------------------------

def test_cli_prune_keeps_the_family_of_a_save_pretrained_directory(capsys, tmp_path, images):
    import json

    from tests.test_cli import run
    from vitrim.adapters.random_data import pseudo_labelled
    from vitrim.prune import PruneConfig

    hf_dir = saved_pretrained(hf_model(), tmp_path / "hf")
    out = tmp_path / "pruned"
    code, stdout, err = run(capsys, "prune", f"hf:{hf_dir}", "--data", "random", "--calib", "16", "--steps", "2",
                            "--round-to", "4", "--runs", "2", "--out", str(out), "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert (report["family"], report["weights"], report["calibration"]) == ("hf", "trained", "random images")
    assert "accuracy" not in report["dense"]  # random images have no labels worth scoring
    assert json.loads((out / "config.json").read_text())["family"] == "hf"
    pruned = vitrim.load(out)
    assert type(pruned).__name__ == "ViTForImageClassification"
    # the same pruning through the Python API gives the very model the command saved
    cfg = PruneConfig(target="flops=0.5", calib_images=16, steps=2, round_to=4)
    model = vitrim.load(hf_dir)
    expected = vitrim.prune(model, config=cfg, data=pseudo_labelled(to_canonical(model), 16), progress=False).model
    assert to_canonical(pruned).config == to_canonical(expected).config
    torch.testing.assert_close(logits(pruned, images), logits(expected, images), atol=1e-5, rtol=0)


def test_cli_bench_analyze_and_eval_on_hf_directories(capsys, tmp_path):
    import json

    from PIL import Image

    from tests.test_cli import run
    from tests.test_data import write_idx_dir

    hf_dir = saved_pretrained(hf_model(num_labels=2), tmp_path / "hf")
    code, stdout, err = run(capsys, "bench", str(hf_dir), "--batch", "2", "--runs", "2", "--json")
    assert code == 0, err
    assert json.loads(stdout)["params"] == sum(p.numel() for p in hf_model(num_labels=2).parameters())
    code, stdout, err = run(capsys, "analyze", f"hf:{hf_dir}", "--runs", "2", "--json")
    assert code == 0 and json.loads(stdout)["components"][-1]["component"] == "head"
    for label, colour in (("cat", 40), ("dog", 200)):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((20, 24, 3), colour + i, dtype=np.uint8)).save(tmp_path / "imgs" / label / f"{i}.png")
    code, stdout, err = run(capsys, "eval", str(hf_dir), "--data", f"folder:{tmp_path / 'imgs'}", "--json")
    assert code == 0 and json.loads(stdout)["count"] == 6, err
    write_idx_dir(tmp_path / "gray", size=8)  # 1-channel 8x8: fits no 3-channel 32x32 model
    code, stdout, err = run(capsys, "eval", str(hf_dir), "--data", f"idx:{tmp_path / 'gray'}")
    assert code == 2 and stdout == "" and err.count("\n") == 1
    assert "1-channel images but the model expects 3" in err and "--data folder:DIR" in err
    code, stdout, err = run(capsys, "prune", str(hf_dir), "--data", f"idx:{tmp_path / 'gray'}")
    assert code == 2 and "--data random" in err


@pytest.mark.parametrize("argv, message", [
    (["eval", "{backbone}"], "ViTModel without a classifier; eval needs class logits"),
    (["bench", "{resnet}"], r"ResNetForImageClassification model\) is not a model vitrim knows; supported"),
    (["prune", "{backbone}", "--data", "random", "--calib", "4", "--objective", "labels"],
     "no head .*--objective features"),
    (["bench", "{vit}", "--pretrained"], "--pretrained .*applies to timm:NAME models"),
    (["analyze", "hf:"], "incomplete: use hf:DIR or timm:NAME"),
])
def test_cli_errors_on_hf_models_are_one_line(capsys, tmp_path, argv, message):
    import re

    from tests.test_cli import run

    dirs = {"vit": saved_pretrained(hf_model(), tmp_path / "vit"),
            "backbone": saved_pretrained(hf_model("ViTModel"), tmp_path / "backbone"),
            "resnet": saved_pretrained(transformers.ResNetForImageClassification(
                transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1])), tmp_path / "resnet")}
    code, stdout, err = run(capsys, *[a.format(**dirs) for a in argv])
    assert code == 2 and stdout == "" and err.count("\n") == 1
    assert re.search(message, err), err


def test_token_reduction_wraps_an_hf_model(images):
    from vitrim.tokens import reduce_tokens

    model = hf_model()
    torch.testing.assert_close(reduce_tokens(model, "evit", keep=1.0)(images), logits(model, images),
                               atol=1e-5, rtol=1e-5)
    reduced = reduce_tokens(model, "evit", layers=(0,), keep=0.5)
    with torch.no_grad():
        out = reduced(images)
    assert reduced.last_token_counts == [17.0, 10.0, 10.0] and out.shape == (2, 5)
    with pytest.raises(ConfigError, match="supported"):
        reduce_tokens(torch.nn.Conv2d(3, 3, 1))
