"""Label-free pruning of backbones: a flat folder of images, the feature-distance objective."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import vitrim  # noqa: E402
from vitrim.adapters import to_canonical  # noqa: E402
from vitrim.data import ImageSet, load_dataset  # noqa: E402
from vitrim.errors import ConfigError, DataError  # noqa: E402
from vitrim.models.config import uniform_config  # noqa: E402
from vitrim.prune.api import PruneConfig, resolve_objective  # noqa: E402
from vitrim.prune.cost import CostModel  # noqa: E402
from vitrim.prune.gates import gate_shapes, gated  # noqa: E402
from vitrim.prune.saliency import (FeatureDistance, classification_loss, feature_distance,  # noqa: E402
                                   output_features, saliency)

SIZE = 32


def perturbed(model):
    """Non-trivial weights everywhere (default inits zero biases and heads)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def hf_backbone():
    cfg = transformers.ViTConfig(image_size=SIZE, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    return perturbed(transformers.ViTModel(cfg, add_pooling_layer=False))


def canonical_vit(**overrides):
    cfg = uniform_config(2, 32, 2, 2.0, image_size=SIZE, patch_size=8, in_chans=3, num_classes=4, **overrides)
    return perturbed(vitrim.create(cfg))


MODELS = {"hf": hf_backbone, "vitrim": canonical_vit}


@pytest.fixture
def flat_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


@pytest.fixture
def flat(flat_folder):
    return load_dataset(f"folder:{flat_folder}", image_size=SIZE, channels=3)


def feature_fisher(model, batches):
    """Fisher saliency of the feature distance, targets sampled around the dense features."""
    return saliency(model, batches, "fisher", loss_fn=FeatureDistance(None, torch.Generator().manual_seed(0)),
                    forward=output_features)


def hf_features(model, x):
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state


# --- data ------------------------------------------------------------------------------------

def test_flat_folder_loads_unlabelled(flat):
    assert len(flat) == 16 and flat.images.shape == (16, 3, SIZE, SIZE)
    assert flat.labels is None and not flat.labelled and flat.class_names == []
    (x, y), = list(flat.batches(16))
    assert x.shape == (16, 3, SIZE, SIZE) and y is None
    assert flat.subset(4).labels is None and len(flat.take(torch.tensor([3, 1]))) == 2


def test_folder_with_images_and_class_folders_is_refused(flat_folder):
    from PIL import Image

    (flat_folder / "cat").mkdir()
    Image.fromarray(np.zeros((SIZE, SIZE, 3), dtype=np.uint8)).save(flat_folder / "cat" / "0.png")
    with pytest.raises(DataError, match=r"both images .* and sub-folders .*<class>/<image>.* no sub-folders"):
        load_dataset(f"folder:{flat_folder}", image_size=SIZE)


def test_unlabelled_data_in_label_paths_raises_one_clear_error(flat, tmp_path):
    from vitrim.bench import evaluate
    from vitrim.train import TrainConfig, fit

    model = canonical_vit()
    fix = r"is unlabelled .* needs labels; put the images in one sub-folder per class .*objective='features'"
    with pytest.raises(DataError, match=fix):
        evaluate(model, flat)
    with pytest.raises(DataError, match=fix):
        flat.check_classes(4)
    with pytest.raises(DataError, match=fix):
        fit(model, flat, TrainConfig(epochs=1, batch_size=8), tmp_path / "run", progress=False)
    with pytest.raises(DataError, match=fix):
        vitrim.prune(model, "flops=0.5", flat, objective="labels", calib_images=16, progress=False)
    with pytest.raises(DataError, match="carry no labels .*objective='features'"):
        classification_loss(torch.zeros(2, 4), None)
    # distilling the logits alone needs no labels
    history = fit(canonical_vit(), flat, TrainConfig(epochs=1, batch_size=8, distill_alpha=1.0, warmup_epochs=0),
                  tmp_path / "kd", teacher=model, progress=False).history
    assert len(history) == 1 and np.isfinite(history[0]["train_loss"])


# --- the objective -----------------------------------------------------------------------------

def test_auto_objective_picks_features_for_backbones_and_unlabelled_data(flat):
    labelled = ImageSet(flat.images, torch.arange(16) % 4, list("abcd"), flat.mean, flat.std, "labelled")
    assert resolve_objective(PruneConfig(), canonical_vit(), labelled).objective == "labels"
    assert resolve_objective(PruneConfig(), canonical_vit(), flat).objective == "features"
    said = []
    cfg = resolve_objective(PruneConfig(), hf_backbone(), labelled, say=said.append)
    assert cfg.objective == "features" and "embed" not in cfg.structures
    assert said[0] == "objective 'auto': features (the model has no classifier)" and "output width stays" in said[1]
    explicit = resolve_objective(PruneConfig(structures="heads,embed"), hf_backbone(), flat)
    assert explicit.structures == ("heads", "embed")
    with pytest.raises(ConfigError, match="no head .*objective='features'"):
        vitrim.prune(hf_backbone(), "flops=0.5", labelled, objective="labels", progress=False)
    with pytest.raises(ConfigError, match="unknown objective"):
        PruneConfig(objective="logits")


def test_feature_loss_is_zero_when_everything_is_kept(flat):
    model = canonical_vit()
    assert feature_distance(model, model, flat) == 0.0
    x, _ = next(flat.batches(16))
    with torch.no_grad():
        target = output_features(model, x)
        assert torch.equal(FeatureDistance()(output_features(model, x), target), torch.zeros(16))
    ones = {k: torch.ones(s) for k, s in gate_shapes(model.config).items()}
    with torch.no_grad(), gated(model, ones):  # the gated forward (masked norms): zero up to rounding
        assert float(FeatureDistance()(output_features(model, x), target).max()) < 1e-10
    with torch.no_grad(), gated(model, {"0.mlp_layer": torch.tensor(0.0)}):
        assert FeatureDistance()(output_features(model, x), target).min() > 0


def test_removed_channels_count_as_lost():
    tokens, pooled = torch.randn(3, 5, 8), torch.randn(3, 8)
    kept = [0, 2, 3, 7]
    loss = FeatureDistance(kept)((tokens[..., kept], pooled[..., kept]), (tokens, pooled))
    lost = [1, 4, 5, 6]
    expected = (tokens[..., lost].pow(2).sum((1, 2)) / (5 * 8) / tokens.pow(2).mean()
                + pooled[..., lost].pow(2).sum(1) / 8 / pooled.pow(2).mean())
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ConfigError, match="embed_index"):
        FeatureDistance()((tokens[..., kept], pooled[..., kept]), (tokens, pooled))


@pytest.mark.parametrize("kind", ["hf", "vitrim"])
def test_fisher_saliency_on_features_reaches_every_gate(flat, kind):
    model = to_canonical(MODELS[kind]())
    batches = [(x, output_features(model, x)) for x, _ in flat.batches(8)]
    scores = feature_fisher(model, batches)
    for key in ("0.heads", "0.qk", "0.mlp", "1.mlp", "embed", "0.attn_layer", "1.mlp_layer"):
        assert bool(torch.isfinite(scores[key]).all()) and float(scores[key].min()) >= 0
        assert float(scores[key].max()) > 0, key
    for key in ("0.mlp", "1.mlp", "embed", "0.v"):
        assert float(scores[key].std()) > 0.05 * float(scores[key].mean()), key  # non-uniform
    # without the sampled targets the distance sits at its minimum: every squared gradient is 0
    flat_scores = saliency(model, batches, "fisher", loss_fn=FeatureDistance(), forward=output_features)
    assert float(flat_scores["0.mlp"].abs().max()) < 1e-10


def test_fisher_feature_saliency_predicts_the_loss_of_removing_a_sublayer(flat):
    model = canonical_vit()
    batches = [(x, output_features(model, x)) for x, _ in flat.batches(16)]
    scores = feature_fisher(model, batches)
    for key in ("0.attn_layer", "0.mlp_layer", "1.attn_layer", "1.mlp_layer"):
        with torch.no_grad(), gated(model, {key: torch.tensor(0.0)}):
            true = float(FeatureDistance()(output_features(model, batches[0][0]), batches[0][1]).mean())
        assert 0.3 * true < float(scores[key]) < 3 * true, key


# --- pruning end to end ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["hf", "vitrim"])
def test_backbone_prunes_to_the_budget_from_a_flat_folder_and_reloads(flat, tmp_path, kind, monkeypatch):
    from vitrim.prune import api

    model = MODELS[kind]()
    dense = to_canonical(model)
    seen = []
    monkeypatch.setattr(api, "saliency", lambda *a, **k: seen.append(saliency(*a, **k)) or seen[-1])
    said = []
    result = vitrim.prune(model, "flops=0.5", flat, objective="features", calib_images=16, batch_size=8,
                          round_to=4, progress=False, log=said.append)
    pruned = result.model
    assert type(pruned) is type(model)
    canonical = to_canonical(pruned)
    flops = CostModel("flops")
    assert result.kept_ratio <= 0.5 and flops.total(canonical.config) / flops.total(dense.config) <= 0.5
    assert canonical.config.embed_dim == 32 and result.embed_index == list(range(32))  # output width kept
    assert result.config.objective == "features" and "embed" not in result.config.structures
    assert any("output width stays" in line for line in said)
    assert len(seen) == 3  # fisher saw a gradient at every step, the first (at the dense model) too
    assert all(float(s["0.mlp"].max()) > 1e-4 and float(s["0.mlp"].std()) > 0.1 * float(s["0.mlp"].mean())
               for s in seen)
    distance = feature_distance(canonical, dense, flat)
    assert 0 < distance < 1
    vitrim.save(pruned, tmp_path / "p")
    again = vitrim.load(tmp_path / "p")
    assert type(again) is type(pruned)
    x, _ = next(flat.batches(4))
    if kind == "hf":
        assert torch.equal(hf_features(again, x), hf_features(pruned, x))
    else:
        with torch.no_grad():
            assert torch.equal(again.forward_features(x), pruned.forward_features(x))


def test_headless_backbone_prunes_with_default_options(flat):
    """What ``vitrim prune MODEL --data folder:DIR`` asks for: auto objective, fisher, reconstruct."""
    model = hf_backbone()
    result = vitrim.prune(model, "flops=0.5", flat, calib_images=16, round_to=4, progress=False)
    assert result.kept_ratio <= 0.5 and result.model.config.hidden_size == 32


def test_reconstruct_lowers_the_feature_distance(flat):
    model = hf_backbone()
    dense = to_canonical(model)
    options = dict(objective="features", calib_images=16, round_to=4, progress=False)
    plain = vitrim.prune(model, "flops=0.5", flat, recover="none", **options)
    refit = vitrim.prune(model, "flops=0.5", flat, recover="reconstruct", **options)
    assert to_canonical(plain.model).config == to_canonical(refit.model).config  # the same plan
    before = feature_distance(to_canonical(plain.model), dense, flat)
    after = feature_distance(to_canonical(refit.model), dense, flat)
    assert after < 0.7 * before


def test_kd_distils_the_features_without_labels(flat):
    model = hf_backbone()  # its canonical head is a zero placeholder: distilling logits would change nothing
    dense = to_canonical(model)
    options = dict(objective="features", calib_images=16, round_to=4, steps=1, progress=False)
    plain = vitrim.prune(model, "flops=0.5", flat, recover="none", **options)
    kd = vitrim.prune(model, "flops=0.5", flat, recover="kd", kd_epochs=8, kd_lr=2e-3, kd_batch_size=8, **options)
    before = feature_distance(to_canonical(plain.model), dense, flat)
    assert feature_distance(to_canonical(kd.model), dense, flat) < 0.9 * before


def test_pruned_embedding_channels_count_in_the_distance(flat):
    model = canonical_vit()
    said = []
    result = vitrim.prune(model, "flops=0.6", flat, objective="features", structures="embed,mlp", calib_images=16,
                          round_to=4, steps=1, recover="none", progress=False, log=said.append)
    kept = result.embed_index
    assert result.model.config.embed_dim == len(kept) < 32 and kept == sorted(set(kept))
    assert any("narrows the output features" in line for line in said)
    distance = feature_distance(result.model, model, flat, embed_index=kept)
    assert distance > 0
    with pytest.raises(ConfigError, match="embed_index"):
        feature_distance(result.model, model, flat)


def test_cli_prunes_a_backbone_from_a_flat_folder(capsys, tmp_path, flat_folder):
    """`vitrim prune DIR --data folder:FLAT` as a user runs it: no labels, no accuracy, width kept."""
    import json

    from tests.test_cli import run

    hf_backbone().save_pretrained(tmp_path / "hf")
    out = tmp_path / "pruned"
    code, stdout, err = run(capsys, "prune", str(tmp_path / "hf"), "--data", f"folder:{flat_folder}", "--calib", "16",
                            "--target", "flops=0.6", "--steps", "1", "--round-to", "4", "--runs", "2",
                            "--threads", "1", "--out", str(out), "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["family"] == "hf" and report["config"]["objective"] == "features"
    assert "accuracy" not in report["pruned"] and report["kept_ratio"] <= 0.6
    pruned = vitrim.load(out)
    assert type(pruned).__name__ == "ViTModel" and pruned.config.hidden_size == 32


# --- distillation objectives ---------------------------------------------------------------------

def test_logits_and_features_distillation_is_the_sum_of_both_losses(flat):
    from vitrim.prune.recover import feature_distillation
    from vitrim.train.loop import distillation_loss

    teacher = canonical_vit()
    student = perturbed(canonical_vit())  # perturbed twice: near the teacher, not equal
    x, _ = next(flat.batches(8))
    with torch.no_grad():
        features = feature_distillation(teacher)(student, x, None)
        both = feature_distillation(teacher, with_logits=True, temperature=2.0)(student, x, None)
        kl = distillation_loss(student(x), teacher(x), 2.0)
        itself = feature_distillation(teacher, with_logits=True)(teacher, x, None)
    assert features > 1e-4 and kl > 1e-6
    torch.testing.assert_close(both, features + kl)
    assert float(itself) < 1e-6


def test_distill_on_logits_and_features_lowers_both_and_names_the_objectives(flat, tmp_path):
    from vitrim.prune.recover import distill, feature_distillation

    teacher = canonical_vit()
    student = perturbed(canonical_vit())
    loss = feature_distillation(teacher, with_logits=True)
    x, _ = next(flat.batches(16))
    with torch.no_grad():
        before = float(loss(student, x, None))
    distill(student, teacher, flat, tmp_path / "kd", epochs=6, lr=2e-3, batch_size=8, progress=False,
            objective="labels+features")
    with torch.no_grad():
        assert float(loss(student, x, None)) < 0.8 * before
    with pytest.raises(ConfigError, match="labels, features, labels\\+features"):
        distill(student, teacher, flat, tmp_path / "bad", objective="logits", progress=False)
