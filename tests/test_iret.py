import pytest
import torch

import vitrim
from tests.conftest import uneven_config
from vitrim.cli import main
from vitrim.errors import ConfigError
from vitrim.iret import IncrementalViT, IretOptions, Lifting2D, incremental_from_vit
from vitrim.iret.model import patchify
from vitrim.models import VisionTransformer, uniform_config
from vitrim.tokens import reduced_flops


def _perturbed(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


@pytest.fixture(scope="module")
def vit():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = uniform_config(4, 32, 2, 2.0, image_size=16, patch_size=4, in_chans=3, num_classes=5,
                         mean=(0.5,) * 3, std=(0.25,) * 3)
    return _perturbed(VisionTransformer(cfg))


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_lifting_starts_as_haar_and_stays_invertible_when_learned(images):
    lifting = Lifting2D(3, kernel=3)
    ll, details = lifting(images)
    blocks = images.unfold(2, 2, 2).unfold(3, 2, 2)  # (B, C, 8, 8, 2, 2)
    torch.testing.assert_close(ll, blocks.mean(dim=(-1, -2)))
    hh = details[:, 6:]
    torch.testing.assert_close(hh, (blocks[..., 1, 1] - blocks[..., 1, 0]) - (blocks[..., 0, 1] - blocks[..., 0, 0]))
    _perturbed(lifting, 0.3)
    ll, details = lifting(images)
    torch.testing.assert_close(lifting.inverse(ll, details), images, atol=1e-5, rtol=1e-5)


def test_fixed_haar_lifting_has_no_trainable_filters():
    assert not any(p.requires_grad for p in Lifting2D(1, learnable=False).parameters())
    assert all(p.requires_grad for p in Lifting2D(1, learnable=True).parameters())


def test_coarse_plus_detail_embedding_equals_the_patch_embedding(vit, images):
    iret = incremental_from_vit(vit)
    ll, details = iret.lifting(images)
    split = iret.coarse_embed(patchify(ll, 2)) + iret.detail_embed(patchify(details, 2))
    torch.testing.assert_close(split, vit.patch_embed(images), atol=1e-5, rtol=1e-5)
    assert vit.patch_embed is not None  # the source model is left intact


def _manual_full_detail(iret: IncrementalViT, images: torch.Tensor) -> torch.Tensor:
    """keep=1 by hand: coarse tokens through the first blocks, every patch's detail added after
    ``detail_layer``, then the remaining blocks."""
    vit, k = iret.model, iret.options.detail_layer
    ll, details = iret.lifting(images)
    x = vit.add_prefix_and_position(iret.coarse_embed(patchify(ll, 2)))
    for block in vit.blocks[: k + 1]:
        x = block(x)
    x = torch.cat([x[:, :1], x[:, 1:] + iret.detail_embed(patchify(details, 2))], dim=1)
    for block in vit.blocks[k + 1:]:
        x = block(x)
    return vit.classify(vit.final_norm(x))


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_keeping_every_patch_adds_every_detail(vit, images, mode):
    iret = incremental_from_vit(vit, IretOptions(detail_layer=1), mode=mode)
    if mode == "dynamic":
        iret.tau = 1.0
    with torch.no_grad():
        torch.testing.assert_close(iret(images), _manual_full_detail(iret, images), atol=1e-5, rtol=1e-5)


def test_dynamic_counts_differ_per_image_and_batching_does_not_change_results(vit, images):
    iret = incremental_from_vit(vit, mode="dynamic")
    iret.tau = 0.6
    with torch.no_grad():
        batched = iret(images)
        single = torch.cat([iret(images[i:i + 1]) for i in range(len(images))])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_fewer_kept_patches_cost_fewer_flops(vit, images):
    iret = incremental_from_vit(vit)
    dense = reduced_flops(iret, images)
    iret.keep = 0.25
    reduced = reduced_flops(iret, images)
    assert iret.last_token_counts == [17.0, 17.0, 5.0, 5.0]
    assert reduced < 0.7 * dense


def test_training_draws_a_keep_ratio_per_batch_and_restores_the_knob(vit, images):
    iret = incremental_from_vit(vit, IretOptions(train_keep=(0.25, 0.5)))
    iret.keep = 0.9
    iret.train()
    counts = set()
    for seed in range(6):
        torch.manual_seed(seed)
        iret(images)
        counts.add(iret.last_token_counts[-1])
    assert counts <= {5.0, 6.0, 7.0, 8.0, 9.0} and len(counts) > 1
    assert iret.keep == 0.9


def test_save_load_round_trip(vit, images, tmp_path):
    iret = incremental_from_vit(vit, IretOptions(detail_layer=2, kernel=5, learnable=False))
    _perturbed(iret.lifting, 0.1)
    iret.keep = 0.5
    vitrim.save(iret, tmp_path / "iret")
    loaded = vitrim.load(tmp_path / "iret")
    assert isinstance(loaded, IncrementalViT) and loaded.options == iret.options
    loaded.keep = 0.5
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), iret(images))


@pytest.mark.parametrize("cfg, options, message", [
    (dict(patch_size=3, image_size=15), IretOptions(), "odd"),
    (dict(class_token=False, pool="mean"), IretOptions(), "class token"),
    (dict(), IretOptions(detail_layer=3), "detail_layer 3"),
])
def test_models_it_cannot_build_from(cfg, options, message):
    base = uneven_config(blocks=uniform_config(4, 24, 2, 2.0).blocks, **cfg)
    with pytest.raises(ConfigError, match=message):
        incremental_from_vit(VisionTransformer(base), options)


@pytest.mark.parametrize("kwargs", [dict(train_keep=(0.0, 1.0)), dict(train_keep=(0.6, 0.5)), dict(kernel=4)])
def test_bad_options(kwargs):
    with pytest.raises(ConfigError):
        IretOptions(**kwargs)


def test_cli_trains_an_incremental_model_from_a_trained_vit(tmp_path, capsys):
    torch.manual_seed(0)
    source = vitrim.create("fmnist-vit-micro")
    vitrim.save(source, tmp_path / "vit")
    out = tmp_path / "iret"
    code = main(["train", "--arch", "iret", "--init", str(tmp_path / "vit"), "--lifting", "haar",
                 "--detail-layer", "0", "--train-keep", "0.2,0.8", "--detail-mixer", "--data", "fashion-mnist", "--limit", "64",
                 "--batch-size", "32", "--epochs", "1", "--no-eval", "--threads", "1", "--out", str(out)])
    assert code == 0
    model = vitrim.load(out)
    assert isinstance(model, IncrementalViT)
    assert model.options == IretOptions(detail_layer=0, learnable=False, train_keep=(0.2, 0.8), detail_mixer=True)
    assert "saved" in capsys.readouterr().out


def test_cli_rejects_a_bad_keep_range(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--arch", "iret", "--train-keep", "0.9,0.1", "--out", "unused"])
    assert "LOW <= HIGH" in capsys.readouterr().err


def test_cli_tokens_sweeps_the_incremental_models_own_knob(tmp_path, capsys):
    import json

    torch.manual_seed(0)
    vitrim.save(incremental_from_vit(vitrim.create("fmnist-vit-micro"), IretOptions(detail_layer=0)), tmp_path / "m")
    code = main(["tokens", str(tmp_path / "m"), "--sweep", "1,0.25", "--no-eval", "--batch", "1", "--runs", "2",
                 "--threads", "1", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "iret" and [r["keep"] for r in report["rows"]] == [1.0, 0.25]
    assert report["rows"][1]["flops_ratio"] < 0.8 * report["rows"][0]["flops_ratio"]


def test_detail_mixer_starts_neutral_and_round_trips(vit, images, tmp_path):
    plain = incremental_from_vit(vit, keep=0.5)
    mixed = incremental_from_vit(vit, IretOptions(detail_mixer=True), keep=0.5)
    with torch.no_grad():
        torch.testing.assert_close(mixed(images), plain(images))  # zero output layer: same model at first
        _perturbed(mixed.detail_mixer, 0.2)
        assert not torch.allclose(mixed(images), plain(images), atol=1e-4)
    vitrim.save(mixed, tmp_path / "m")
    loaded = vitrim.load(tmp_path / "m")
    assert loaded.options.detail_mixer
    loaded.keep = 0.5
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), mixed(images))
    kept = 0.5 * vit.config.num_patches
    extra = reduced_flops(mixed, images) - reduced_flops(plain, images)
    assert extra == pytest.approx(kept * 2 * 3 * 32 * 32)


def test_dense_top_runs_keep_1_as_the_dense_vit_and_below_it_as_before(vit, images):
    top = incremental_from_vit(vit, IretOptions(dense_top=True, detail_mixer=True))
    plain = incremental_from_vit(vit, IretOptions(detail_mixer=True))
    _perturbed(top.detail_mixer, 0.2)
    plain.load_state_dict(top.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(top(images), vit(images), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(plain(images), vit(images), atol=1e-3)  # coarse first blocks
        assert top.last_token_counts == [17.0] * 4
        dense_flops = reduced_flops(vit_tokens := vitrim.tokens.reduce_tokens(vit, "drop"), images)
        assert vit_tokens.keep == 1
        lifting = 2 * 2 * 3 * 3 * 16 * 16
        assert reduced_flops(top, images) == pytest.approx(dense_flops + lifting)  # no mixer at the top
        top.keep = plain.keep = 0.5
        torch.testing.assert_close(top(images), plain(images))
        top.mode = plain.mode = "dynamic"
        top.tau = plain.tau = 1.0
        torch.testing.assert_close(top(images), plain(images))  # per image: details after detail_layer


def test_dense_top_round_trips(vit, images, tmp_path):
    top = incremental_from_vit(vit, IretOptions(dense_top=True, sandwich=True))
    _perturbed(top.detail_embed, 0.1)
    vitrim.save(top, tmp_path / "top")
    loaded = vitrim.load(tmp_path / "top")
    assert loaded.options.dense_top and loaded.options.sandwich
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), top(images))


def test_dense_top_trains_both_paths_in_a_sandwich(vit, images):
    top = incremental_from_vit(vit, IretOptions(dense_top=True, sandwich=True, train_keep=(0.25, 1.0)))
    top.train()
    top(torch.cat([images, images]))
    assert top.keep == 1 and top.last_token_counts[-1] < 17  # the second half ran coarse, reduced
    top.zero_grad()
    top.eval()(images).sum().backward()
    assert top.coarse_embed.weight.grad is not None and top.detail_embed.weight.grad.abs().sum() > 0


def test_cli_dense_top_needs_the_sandwich(tmp_path, capsys):
    torch.manual_seed(0)
    vitrim.save(vitrim.create("fmnist-vit-micro"), tmp_path / "vit")
    code = main(["train", "--arch", "iret", "--init", str(tmp_path / "vit"), "--dense-top", "--no-eval",
                 "--limit", "32", "--epochs", "1", "--out", str(tmp_path / "iret")])
    assert code != 0 and "add --sandwich" in capsys.readouterr().err
    assert not (tmp_path / "iret").exists()
