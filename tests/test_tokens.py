import pytest
import torch

import vitrim
from tests.conftest import uneven_config
from vitrim.errors import ConfigError
from vitrim.models import VisionTransformer, uniform_config
from vitrim.tokens import reduce_tokens
from vitrim.models.tokens import TokenState
from vitrim.tokens.primitives import bipartite_merge, drop_tokens, mass_counts
from vitrim.tokens.reducers import DropReducer


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    cfg = uniform_config(4, 32, 2, 2.0, image_size=16, patch_size=2, in_chans=1, num_classes=5,
                         mean=(0.5,), std=(0.25,))
    torch.manual_seed(0)
    m = VisionTransformer(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method, mode", [("drop", "static"), ("evit", "static"), ("tome", "static"),
                                          ("drop", "dynamic"), ("evit", "dynamic"), ("tome", "dynamic")])
def test_zero_reduction_reproduces_the_model(model, images, method, mode):
    reduced = reduce_tokens(model, method, mode=mode, keep=1.0)
    with torch.no_grad():
        torch.testing.assert_close(reduced(images), model(images), atol=1e-5, rtol=1e-5)
        if mode == "dynamic":  # the threshold at its no-reduction end
            reduced.tau = 1.0
            torch.testing.assert_close(reduced(images), model(images), atol=1e-5, rtol=1e-5)


def test_distillation_token_is_kept(images):
    torch.manual_seed(0)
    m = VisionTransformer(uniform_config(2, 32, 2, 2.0, image_size=16, patch_size=2, in_chans=1, num_classes=5,
                                         mean=(0.5,), std=(0.25,), distill_token=True, distill_head=True)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        reduced = reduce_tokens(m, "evit", layers=(0,), keep=1.0)
        torch.testing.assert_close(reduced(images), m(images), atol=1e-5, rtol=1e-5)
        reduced.keep = 0.5
        reduced(images)
    assert reduced.last_token_counts[1] == 2 + 32 + 1


def test_mean_pool_zero_reduction(images):
    torch.manual_seed(0)
    m = VisionTransformer(uniform_config(2, 32, 2, 2.0, image_size=16, patch_size=2, in_chans=1, num_classes=5,
                                         mean=(0.5,), std=(0.25,), pool="mean", class_token=False)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reduce_tokens(m, "tome", keep=1.0)(images), m(images), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["drop", "evit", "tome"])
def test_knob_changes_token_count_between_calls(model, images, method):
    reduced = reduce_tokens(model, method, layers=(0, 2), keep=1.0)
    with torch.no_grad():
        full = reduced(images)
        reduced.keep = 0.5
        half = reduced(images)
    assert reduced.last_token_counts[0] == 65
    expected_after_0 = 1 + 32 + (1 if method == "evit" else 0)
    assert reduced.last_token_counts[1] == expected_after_0
    assert reduced.last_token_counts[3] < expected_after_0
    assert half.shape == full.shape and not torch.allclose(half, full)


def test_drop_keeps_the_most_attended_tokens():
    x = torch.arange(5.0).view(1, 5, 1).expand(1, 5, 2).clone()
    sizes = torch.ones(1, 5)
    scores = torch.tensor([[0.5, 0.1, 0.4, 0.2, 0.3]])
    kept, _, dest = drop_tokens(x, sizes, scores, keep=2, prefix=1)
    assert kept[0, :, 0].tolist() == [0.0, 2.0, 4.0]
    assert dest[0].tolist() == [0, -1, 1, -1, 2]
    fused, fused_sizes, dest = drop_tokens(x, sizes, scores, keep=2, prefix=1, fuse=True)
    assert fused[0, -1, 0].item() == pytest.approx((0.1 * 1 + 0.2 * 3) / 0.3)
    assert fused_sizes[0, -1].item() == 2
    assert dest[0].tolist() == [0, 3, 1, 3, 2]
    for fuse, full in ((False, kept), (True, fused)):  # without the bookkeeping: the same tokens, no dest
        lean, lean_sizes, none = drop_tokens(x, sizes, scores, keep=2, prefix=1, fuse=fuse, need_dest=False)
        assert none is None
        torch.testing.assert_close(lean, full, rtol=0, atol=0)
    torch.testing.assert_close(lean_sizes, fused_sizes, rtol=0, atol=0)


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("knobs", [{"keep": 0.5}, {"mode": "dynamic", "tau": 0.6}])
def test_drop_reducer_without_the_bookkeeping_gives_the_same_tokens(fuse, knobs):
    torch.manual_seed(0)
    x = torch.randn(3, 9, 8)  # (B, N, C)
    capture = {"q": torch.randn(3, 2, 9, 4), "k": torch.randn(3, 2, 9, 4), "scale": 0.5, "bias": None}
    state = TokenState(torch.ones(3, 9), None, False)
    lean = DropReducer(1, (0,), fuse=fuse, **knobs)
    recording = DropReducer(1, (0,), fuse=fuse, refine=lambda tokens, dest, valid: tokens, **knobs)
    assert not lean.needs_dest and recording.needs_dest
    tokens, sizes, valid, dest = lean.step(x, state, capture)
    full = recording.step(x, state, capture)
    assert dest is None and full[3].shape == (3, 9)
    for part, whole in zip((tokens, sizes, valid), full[:3]):
        if whole is None:
            assert part is None
        else:
            torch.testing.assert_close(part, whole, rtol=0, atol=0)


def test_bipartite_merge_preserves_mass():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 4)
    sizes = torch.ones(2, 9)
    merged, new_sizes, dest, valid = bipartite_merge(x, x, sizes, r=3, prefix=1)
    assert valid is None
    assert merged.shape == (2, 6, 4) and new_sizes.sum(1).tolist() == [9.0, 9.0]
    torch.testing.assert_close((merged * new_sizes.unsqueeze(-1)).sum(1), x.sum(1))
    torch.testing.assert_close(merged[:, 0], x[:, 0])
    # every old token lands in a token whose size counts it, and the sizes add up
    counted = torch.zeros(2, 6).scatter_add(1, dest, torch.ones(2, 9))
    torch.testing.assert_close(counted, new_sizes)
    # without the bookkeeping of where tokens went: the same merge, no dest
    for threshold in (None, 0.2):
        kept = bipartite_merge(x, x, sizes, r=3, prefix=1, threshold=threshold)
        lean = bipartite_merge(x, x, sizes, r=3, prefix=1, threshold=threshold, need_dest=False)
        assert lean[2] is None
        for full, part in zip(kept[:2] + kept[3:], lean[:2] + lean[3:]):
            torch.testing.assert_close(part, full, rtol=0, atol=0)


@pytest.mark.parametrize("method, mode", [("drop", "static"), ("evit", "static"), ("tome", "static"),
                                          ("evit", "dynamic"), ("tome", "dynamic")])
def test_restored_grid_for_dense_outputs(model, images, method, mode):
    reduced = reduce_tokens(model, method, mode=mode, layers=(1, 2), keep=1.0)
    with torch.no_grad():
        full, _ = reduced.forward_features(images, restore=True)
        torch.testing.assert_close(full, model.forward_features(images), atol=1e-5, rtol=1e-5)
        if mode == "dynamic":
            reduced.tau = 0.6 if method == "evit" else 0.0
        else:
            reduced.keep = 0.4
        grid, _ = reduced.forward_features(images, restore=True)
        tokens, _ = reduced.forward_features(images)
    assert grid.shape == (3, 65, 32) and tokens.shape[1] < 65
    if method != "drop":  # fused or merged patches are filled from the token they went into
        rows = {tuple(r.tolist()) for r in grid[0, 1:].round(decimals=4)}
        assert rows <= {tuple(r.tolist()) for r in tokens[0, 1:].round(decimals=4)}


@pytest.mark.parametrize("method, mode, knob", [("evit", "static", {"keep": 0.4}), ("evit", "dynamic", {"tau": 0.6}),
                                               ("tome", "static", {"keep": 0.4}), ("tome", "dynamic", {"tau": 0.0}),
                                               ("drop", "static", {"keep": 0.4})])
def test_fused_and_merged_tokens_count_their_patches(model, images, method, mode, knob):
    """Sizes are what proportional attention weighs tokens by: fusing and merging keep every patch."""
    reduced = reduce_tokens(model, method, layers=(0, 2), mode=mode, **knob)
    with torch.no_grad():
        _, state = reduced.forward_features(images)
    sizes, valid = state.sizes, state.valid
    counted = (sizes[:, 1:] * (valid[:, 1:] if valid is not None else 1)).sum(1)
    patches = model.config.num_patches
    if method == "drop":
        assert counted.tolist() == [round(round(0.4 * patches) * 0.4)] * len(images)
    else:
        torch.testing.assert_close(counted, torch.full((len(images),), float(patches)))
        assert sizes[:, 1:].max() > 1


def test_mass_counts_give_easy_images_fewer_tokens():
    peaked = torch.tensor([[0.0, 0.9, 0.05, 0.03, 0.02]])
    flat = torch.tensor([[0.0, 0.25, 0.25, 0.25, 0.25]])
    assert mass_counts(peaked, 0.9, prefix=1).item() == 1
    assert mass_counts(flat, 0.9, prefix=1).item() == 4


@pytest.mark.parametrize("method, tau", [("drop", 0.5), ("evit", 0.5), ("tome", 0.0)])
def test_dynamic_threshold_gives_per_image_counts_and_matches_batch_of_one(model, images, method, tau):
    reduced = reduce_tokens(model, method, mode="dynamic", layers=(0, 2), tau=tau)
    with torch.no_grad():
        batch = reduced(images)
        singles = torch.cat([reduced(images[i : i + 1]) for i in range(len(images))])
    torch.testing.assert_close(batch, singles, atol=1e-5, rtol=1e-5)


def test_similarity_threshold_merges_redundant_tokens_only():
    """Per image, tome merges the pairs above the threshold: plain (repeated) content merges,
    distinct content does not, and the batch pads to the image that keeps most."""
    torch.manual_seed(0)
    distinct = torch.linalg.qr(torch.randn(8, 8)).Q[None]  # orthonormal rows: similarity 0
    plain = torch.ones(1, 8, 8) + 0.01 * torch.randn(1, 8, 8)  # near-identical tokens
    x = torch.cat([torch.cat([torch.zeros(1, 1, 8), t], 1) for t in (distinct, plain)])  # (2, 9, 8)
    sizes = torch.ones(2, 9)
    merged, new_sizes, dest, valid = bipartite_merge(x, x, sizes, r=4, prefix=1, threshold=0.5)
    assert valid.sum(1).tolist() == [9, 5]  # the plain image merged 4 pairs, the distinct one none
    assert merged.shape[1] == 9
    counted = (new_sizes * valid).sum(1)
    assert counted.tolist() == [9.0, 9.0]
    torch.testing.assert_close((merged * new_sizes.unsqueeze(-1)).sum(1), x.sum(1))
    assert (dest >= 0).all() and (new_sizes[~valid] == 0).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(keep=0.0), r"keep ratio must be in \(0, 1\]"), (dict(keep=1.5), "keep ratio"),
    (dict(mode="dynamic", tau=float("nan")), "finite"), (dict(tau=0.5), "mode='dynamic'"),
    (dict(layers=(7,)), "outside the model's 4 blocks"), (dict(method="prune"), "unknown token method"),
])
def test_bad_knobs(model, kwargs, message):
    kwargs = dict(kwargs)
    method = kwargs.pop("method", "drop")
    with pytest.raises(ConfigError, match=message):
        reduce_tokens(model, method, **kwargs)


def test_unreadable_attention_is_reported():
    model = vitrim.create(uneven_config())  # block 2 has no attention
    with pytest.raises(ConfigError, match="block 2 has no attention"):
        reduce_tokens(model, "drop", layers=(2,))
    no_cls = vitrim.create(uneven_config(pool="mean", class_token=False))
    with pytest.raises(ConfigError, match="no class token"):
        reduce_tokens(no_cls, "evit", layers=(0,))


def test_reduced_flops_fall_with_the_knob(model, images):
    from vitrim.bench.flops import model_cost
    from vitrim.tokens import reduced_flops

    reduced = reduce_tokens(model, "drop", layers=(0,), keep=1.0)
    assert reduced_flops(reduced, images) == model_cost(model.config).flops
    reduced.keep = 0.25
    assert reduced_flops(reduced, images) < 0.5 * model_cost(model.config).flops


def test_cli_tokens_sweep(capsys, tmp_path, model):
    import json

    from tests.test_cli import run
    from tests.test_data import write_idx_dir

    write_idx_dir(tmp_path / "data", n_train=8, n_test=16, size=16)
    vitrim.save(vitrim.create(model.config.replace(num_classes=3), seed=0), tmp_path / "m")
    code, out, err = run(capsys, "tokens", str(tmp_path / "m"), "--data", f"idx:{tmp_path / 'data'}", "--sweep",
                         "1,0.5", "--runs", "2", "--batch", "2", "--threads", "1", "--json")
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert [r["keep"] for r in rows] == [1.0, 0.5]
    assert rows[0]["flops_ratio"] == pytest.approx(1.0) and rows[1]["flops_ratio"] < 1.0
    code, _, err = run(capsys, "tokens", str(tmp_path / "m"), "--sweep", "1,2", "--no-eval")
    assert code == 2 and "keep ratio must be in (0, 1]" in err


def test_training_draws_a_keep_ratio_per_batch(model, images):
    reduced = reduce_tokens(model, "tome", layers=(0,), keep=0.9, train_keep=(0.3, 0.7), sandwich=True)
    counts = set()
    reduced.train()
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(6):
            reduced(images)
            counts.add(reduced.last_token_counts[1])
    assert len(counts) > 1 and all(1 + 0.3 * 64 - 1 <= c <= 1 + 0.7 * 64 + 1 for c in counts)
    with torch.no_grad():
        trained_view = reduced(images)
    reduced.eval()
    with torch.no_grad():
        reduced(images)
        assert reduced.last_token_counts[1] == 1 + round(0.9 * 64) and reduced.keep == 0.9
        reduced.keep = 0.7  # the first half of a training batch runs at the top of the range
        torch.testing.assert_close(trained_view[:1], reduced(images[:1]))
    with pytest.raises(ConfigError, match="train_keep"):
        reduce_tokens(model, "tome", train_keep=(0.8, 0.2))


def test_saved_token_model_keeps_its_reduction(model, images, tmp_path):
    reduced = reduce_tokens(model, "tome", layers=(0, 2), keep=0.5)
    vitrim.save(reduced, tmp_path / "m")
    loaded = vitrim.load(tmp_path / "m")
    assert isinstance(loaded, VisionTransformer)
    assert loaded.token_reduction == {"method": "tome", "layers": [0, 2]}
    again = reduce_tokens(loaded, keep=0.5)  # method and layers from the saved model
    assert (again.method, again.layers) == ("tome", (0, 2))
    with torch.no_grad():
        torch.testing.assert_close(again(images), reduced(images))
    assert reduce_tokens(loaded, "drop").layers != (0, 2)  # another method: its own default layers
    vitrim.save(loaded, tmp_path / "again")  # a plain save keeps it too
    assert vitrim.load(tmp_path / "again").token_reduction == loaded.token_reduction


def test_broken_token_settings_are_reported(model, tmp_path):
    import json

    from vitrim.errors import ModelFileError

    vitrim.save(reduce_tokens(model, "tome", layers=(1,)), tmp_path / "m")
    config = tmp_path / "m" / "config.json"
    data = json.loads(config.read_text())
    data["tokens"]["method"] = "merge"
    config.write_text(json.dumps(data))
    with pytest.raises(ModelFileError, match='"tokens" must be'):
        vitrim.load(tmp_path / "m")


def test_cli_fine_tunes_for_token_reduction(tmp_path, capsys):
    import json

    from vitrim.cli import main

    torch.manual_seed(0)
    vitrim.save(vitrim.create("fmnist-vit-micro"), tmp_path / "vit")
    out = tmp_path / "tuned"
    code = main(["train", "--arch", "tokens", "--init", str(tmp_path / "vit"), "--token-method", "evit",
                 "--layers", "0,1", "--train-keep", "0.4,0.9", "--sandwich", "--data", "fashion-mnist", "--limit", "64",
                 "--batch-size", "32", "--epochs", "1", "--no-eval", "--threads", "1", "--out", str(out)])
    assert code == 0
    assert vitrim.load(out).token_reduction == {"method": "evit", "layers": [0, 1]}
    capsys.readouterr()
    code = main(["tokens", str(out), "--sweep", "1,0.5", "--no-eval", "--batch", "1", "--runs", "2",
                 "--threads", "1", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "evit" and report["layers"] == [0, 1]
    assert main(["train", "--arch", "tokens", "--out", str(tmp_path / "x"), "--epochs", "1"]) == 2
    assert "pass --init MODEL" in capsys.readouterr().err


def test_cli_rejects_layers_that_are_not_block_indices(capsys):
    from vitrim.cli import main

    with pytest.raises(SystemExit):
        main(["tokens", "fmnist-vit", "--layers", "2,x", "--no-eval"])
    assert "expected comma-separated block indices, got '2,x'" in capsys.readouterr().err


def _rich_model(drop_path_rate: float = 0.0) -> VisionTransformer:
    """LayerScale, q/k norm, registers, a gated MLP and stochastic depth: what a reduced model must keep."""
    cfg = uniform_config(4, 32, 2, 2.0, image_size=16, patch_size=2, in_chans=1, num_classes=5, mean=(0.5,),
                         std=(0.25,), layer_scale_init=0.3, qk_norm=True, reg_tokens=2, mlp_gated=True,
                         mlp_act="silu", drop_path_rate=drop_path_rate)
    torch.manual_seed(3)
    m = VisionTransformer(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.mark.parametrize("method", ["drop", "evit", "tome"])
def test_reduced_model_runs_the_models_own_blocks(images, method):
    """One forward: at keep=1 a reduced model is its model, in eval and (same drop-path draws) in training."""
    model = _rich_model(drop_path_rate=0.4)
    reduced = reduce_tokens(model, method, layers=(1, 2), keep=1.0)
    with torch.no_grad():
        torch.testing.assert_close(reduced(images), model.eval()(images), atol=0, rtol=0)
        model.train(), reduced.train()
        torch.manual_seed(7)
        expected = model(images)
        torch.manual_seed(7)
        torch.testing.assert_close(reduced(images), expected, atol=0, rtol=0)
        torch.manual_seed(8)
        assert not torch.allclose(reduced(images), expected)  # stochastic depth is really on


def test_fine_tuning_a_reduced_model_keeps_stochastic_depth(images, monkeypatch):
    """keep < 1 in training (what `vitrim train --arch tokens|iret` runs) drops residual branches too."""
    import vitrim.models.vit as vit
    from vitrim.iret import incremental_from_vit

    model = _rich_model(drop_path_rate=0.4)
    calls = []
    real = vit.drop_path
    monkeypatch.setattr(vit, "drop_path", lambda x, rate, training: calls.append((rate, training)) or real(x, rate, training))
    for wrapped in (reduce_tokens(model, "tome", layers=(1,), keep=0.5, train_keep=(0.3, 0.9)),
                    incremental_from_vit(model)):
        calls.clear()
        wrapped.train()
        wrapped(images)
        rates = [rate for rate, training in calls if training]
        assert len(rates) == 2 * model.config.depth and max(rates) == pytest.approx(0.4)


def test_feature_maps_for_dense_heads(model, images):
    """Backbone interface: (B, C, G, G) maps from chosen blocks; a reduced model restores the grid."""
    G, C = model.config.grid_size, model.config.embed_dim
    with torch.no_grad():
        first, last = model.forward_intermediates(images, [1, -1])
        tokens = model.forward_features(images)
        assert first.shape == last.shape == (3, C, G, G)
        torch.testing.assert_close(last, model.grid_map(tokens), atol=0, rtol=0)
        reduced = reduce_tokens(model, "tome", layers=(0, 2), keep=1.0)
        for a, b in zip(reduced.forward_intermediates(images, [1, -1]), (first, last)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        reduced.keep = 0.5
        maps = reduced.forward_intermediates(images, [-1])
        grid, _ = reduced.forward_features(images, restore=True)
    assert reduced.last_token_counts[-1] < model.config.num_tokens  # really reduced, then unmerged
    torch.testing.assert_close(maps[0], model.grid_map(grid), atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="outside the model's 4 blocks"):
        model.forward_intermediates(images, [4])
