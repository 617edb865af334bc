"""The hf-clip family: CLIPVisionModel / CLIPVisionModelWithProjection <-> the canonical ViT."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import vitrim  # noqa: E402
from vitrim.adapters import family_of, from_canonical, head_kind, metadata, prunable, to_canonical  # noqa: E402
from vitrim.adapters.registry import get_family  # noqa: E402
from vitrim.errors import ConfigError  # noqa: E402
from vitrim.prune.plan import PrunePlan  # noqa: E402
from vitrim.prune.surgery import slice_model  # noqa: E402
from vitrim.tokens import reduce_tokens  # noqa: E402

SIZE = 32
TOL = 1e-5
CLASSES = ["CLIPVisionModel", "CLIPVisionModelWithProjection"]
KIND_SETS = [["heads"], ["mlp"], ["embed"], ["attn_layer"], ["mlp_layer"],
             ["heads", "mlp", "embed", "attn_layer", "mlp_layer"]]


def perturbed(model):
    """Weights re-initialised with normal std 0.1, so LayerNorms and biases are non-trivial."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model.eval()


def random_plan(cfg, kinds, seed=0):
    """A random plan for a 2-block model: one head, half the MLP, 5 embedding channels, block 0's
    attention, block 1's MLP (as ``kinds`` says)."""
    rng = random.Random(seed)
    plan = PrunePlan.keep_all(cfg)
    if "embed" in kinds:
        plan.embed = sorted(rng.sample(plan.embed, cfg.embed_dim - 5))
    for bp, d in zip(plan.blocks, cfg.blocks):
        if d.attention and "heads" in kinds and d.heads > 1:
            bp.heads = sorted(rng.sample(bp.heads, d.heads - 1))
            bp.qk = [list(range(d.qk_dim)) for _ in bp.heads]
            bp.v = [list(range(d.v_dim)) for _ in bp.heads]
        if d.mlp and "mlp" in kinds:
            bp.mlp = sorted(rng.sample(bp.mlp, d.mlp_dim // 2))
    if "attn_layer" in kinds:
        plan.blocks[0].attention = False
    if "mlp_layer" in kinds:
        plan.blocks[-1].mlp_on = False
    return plan


def images(n=3, seed=0):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def clip_model(hf_class, **overrides):
    cfg = transformers.CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, image_size=SIZE, patch_size=8, projection_dim=16,
                                        **overrides)
    torch.manual_seed(0)
    return perturbed(getattr(transformers, hf_class)(cfg))


def hf_outputs(model, x):
    """``{name: tensor}`` of what the CLIP class outputs."""
    with torch.no_grad():
        out = model(pixel_values=x)
    if isinstance(model, transformers.CLIPVisionModelWithProjection):
        return {"last_hidden_state": out.last_hidden_state, "image_embeds": out.image_embeds}
    return {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}


def canonical_outputs(canonical, x, hf_class):
    """The canonical equivalents of :func:`hf_outputs`."""
    with torch.no_grad():
        tokens = canonical.forward_features(x)  # (B, N, C), un-normalised (fc_norm)
        if hf_class == "CLIPVisionModelWithProjection":
            return {"last_hidden_state": tokens, "image_embeds": canonical.classify(tokens)}
        return {"last_hidden_state": tokens, "pooler_output": canonical.pooled(tokens)}


def assert_outputs_close(got, expected):
    assert got.keys() == expected.keys()
    for name in got:
        assert got[name].shape == expected[name].shape, name
        assert (got[name] - expected[name]).abs().max().item() <= TOL, name


ALL_KINDS = ["heads", "mlp", "embed", "attn_layer", "mlp_layer"]


def assert_same_canonical(got, expected):
    """Same config and bit-identical weights."""
    assert got.config == expected.config
    assert got.state_dict().keys() == expected.state_dict().keys()
    for name, tensor in expected.state_dict().items():
        assert torch.equal(got.state_dict()[name], tensor), name


def check_round_trip(model):
    """canonical -> HF -> canonical is identical, and the HF model is rebuilt bit for bit; returns it."""
    canonical = to_canonical(model)
    back = from_canonical(canonical, metadata(model))
    assert type(back) is type(model)
    assert_same_canonical(to_canonical(back), canonical)
    assert back.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    return back


def pruned_back(model, kinds):
    """(the canonical model pruned with a random plan of ``kinds``, it converted back to ``model``'s class)."""
    canonical = to_canonical(model)
    small = slice_model(canonical, random_plan(canonical.config, kinds))
    back = from_canonical(small, metadata(model))
    assert type(back) is type(model)
    assert sum(p.numel() for p in back.parameters()) < sum(p.numel() for p in model.parameters())
    assert_same_canonical(to_canonical(back), small)
    return small, back


def check_export(reduced, tmp_path):
    """A token-reduced model exports to ONNX, and ONNX Runtime matches it."""
    from vitrim.quant.export import export
    from vitrim.quant.runtime import OnnxModel

    x = images(4, seed=1)
    result = export(reduced, tmp_path / "m.onnx", check_images=x, threads=1)
    assert result.check.passed
    with torch.no_grad():
        expected = reduced(x)
    assert expected.abs().max() > 0
    torch.testing.assert_close(OnnxModel(tmp_path / "m.onnx", threads=1)(x), expected, atol=1e-4, rtol=1e-4)


def check_save_load(model, tmp_path, outputs):
    """A pruned model saved with vitrim.save loads in its class with the same ``outputs(model, x)``."""
    _, pruned = pruned_back(model, ALL_KINDS)
    vitrim.save(pruned, tmp_path / "m")
    loaded = vitrim.load(tmp_path / "m")
    assert type(loaded) is type(model)
    x = images()
    assert_outputs_close(outputs(loaded, x), outputs(pruned, x))


def check_pruned_to_half(model, tmp_path, outputs):
    """vitrim.prune to 0.5 FLOPs without labels (a backbone), saved and reloaded in its class."""
    from vitrim.bench.flops import model_cost
    from vitrim.data.dataset import ImageSet

    cfg = to_canonical(model).config
    pictures = (torch.rand(16, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    data = ImageSet(pictures, None, [], cfg.mean, cfg.std, name="random images")
    result = vitrim.prune(model, "flops=0.5", data, calib_images=16, batch_size=8, steps=1, round_to=2,
                          progress=False)
    assert type(result.model) is type(model) and result.config.objective == "features"
    assert model_cost(to_canonical(result.model).config).flops <= 0.5 * model_cost(cfg).flops
    vitrim.save(result.model, tmp_path / "half")
    loaded = vitrim.load(tmp_path / "half")
    assert type(loaded) is type(model)
    x = images()
    assert_outputs_close(outputs(loaded, x), outputs(result.model, x))


def check_save_pretrained(model, tmp_path, outputs):
    """A save_pretrained directory loads through the registry in its class, same ``outputs``."""
    model.save_pretrained(tmp_path / "hf")
    loaded = vitrim.load(tmp_path / "hf")
    assert type(loaded) is type(model)
    x = images()
    assert_outputs_close(outputs(loaded, x), outputs(model, x))


@pytest.mark.parametrize("hf_class", CLASSES)
def test_family_is_registered(hf_class):
    model = clip_model(hf_class)
    assert family_of(model) == "hf-clip"
    assert head_kind(model) == ("pooler" if hf_class.endswith("Projection") else "none")
    assert set(prunable(model)) == {"heads", "mlp", "embed", "attn_layer", "mlp_layer"}
    family = get_family("hf-clip")
    assert hf_class in family.hf_classes and family.hf_model_types == ("clip_vision_model",)
    names = [k for k in model.state_dict()]
    assert family.hf_infer_class(model.config.to_dict(), names) == hf_class
    family.hf_check_config(model.config.to_dict(), "config.json")


@pytest.mark.parametrize("hf_class", CLASSES)
def test_identity_conversion(hf_class):
    model = clip_model(hf_class)
    canonical = to_canonical(model)
    cfg = canonical.config
    assert cfg.pre_norm and cfg.fc_norm and not cfg.patch_bias and not cfg.head_bias and cfg.mlp_act == "quick_gelu"
    assert cfg.mean == (0.48145466, 0.4578275, 0.40821073) and cfg.std == (0.26862954, 0.26130258, 0.27577711)
    x = images()
    assert_outputs_close(canonical_outputs(canonical, x, hf_class), hf_outputs(model, x))


@pytest.mark.parametrize("hf_class", CLASSES)
def test_round_trip_is_identical(hf_class):
    check_round_trip(clip_model(hf_class))


@pytest.mark.parametrize("kinds", KIND_SETS, ids=["+".join(k) for k in KIND_SETS])
@pytest.mark.parametrize("hf_class", CLASSES)
def test_pruned_model_converts_back(hf_class, kinds):
    small, back = pruned_back(clip_model(hf_class), kinds)
    x = images()
    assert_outputs_close(hf_outputs(back, x), canonical_outputs(small, x, hf_class))


@pytest.mark.parametrize("hf_class", CLASSES)
def test_token_reduction(hf_class):
    model = clip_model(hf_class)
    canonical = to_canonical(model)
    x = images()
    full = reduce_tokens(model, "tome", keep=1.0)
    with torch.no_grad():
        tokens, state = full.forward_features(x)
        assert (full(x) - canonical(x)).abs().max().item() <= TOL
        expected = canonical_outputs(canonical, x, hf_class)
        reduced = {"last_hidden_state": tokens, "pooler_output": full.model.pooled(tokens, state),
                   "image_embeds": full.model.classify(tokens, state)}
        assert_outputs_close({k: reduced[k] for k in expected}, expected)
    for method in ("tome", "drop", "evit"):
        half = reduce_tokens(model, method, keep=0.5)
        with torch.no_grad():
            tokens, state = half.forward_features(x)
            logits = half(x)
        assert tokens.shape[1] < canonical.config.num_tokens and logits.shape == (3, canonical.config.num_classes)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("hf_class", CLASSES)
def test_onnx_export_of_reduced_model(tmp_path, hf_class):
    reduced = reduce_tokens(clip_model(hf_class), "tome", keep=0.5)
    if hf_class == "CLIPVisionModel":  # a zero placeholder head: give the check something to compare
        with torch.no_grad():
            reduced.model.head.weight.normal_()
    check_export(reduced, tmp_path)


@pytest.mark.parametrize("hf_class", CLASSES)
def test_unsupported_activation_is_one_clear_error(hf_class):
    model = clip_model(hf_class, hidden_act="relu")
    with pytest.raises(ConfigError, match="CLIP hidden_act 'relu' is not supported .*quick_gelu"):
        to_canonical(model)


@pytest.mark.parametrize("hf_class", CLASSES)
def test_pruned_model_saves_and_loads_in_its_class(tmp_path, hf_class):
    check_save_load(clip_model(hf_class), tmp_path, hf_outputs)


@pytest.mark.parametrize("hf_class", CLASSES)
def test_save_pretrained_directory_loads(tmp_path, hf_class):
    check_save_pretrained(clip_model(hf_class), tmp_path, hf_outputs)


@pytest.mark.parametrize("hf_class", CLASSES)
def test_pruned_to_half_the_flops_reloads_in_its_class(hf_class, tmp_path):
    check_pruned_to_half(clip_model(hf_class), tmp_path, hf_outputs)
