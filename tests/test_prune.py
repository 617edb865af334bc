import copy
import json

import pytest
import torch

import vitrim
from tests.conftest import uneven_config
from tests.test_cli import run
from tests.test_data import write_idx_dir
from vitrim.data.dataset import ImageSet
from vitrim.errors import ConfigError
from vitrim.models import uniform_config
from vitrim.prune import PruneConfig, prune
from vitrim.prune.cost import CostModel


def random_set(cfg, n=64, classes=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, cfg.in_chans, cfg.image_size, cfg.image_size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, classes or cfg.num_classes, (n,), generator=g)
    return ImageSet(images, labels, [str(i) for i in range(cfg.num_classes)], cfg.mean, cfg.std)


@pytest.fixture(scope="module")
def wide_model():
    """Uniform 3-block model with enough channels for fine-grained budgets."""
    cfg = uniform_config(3, 32, 4, 2.0, image_size=16, patch_size=4, in_chans=1, num_classes=4,
                         mean=(0.5,), std=(0.25,))
    torch.manual_seed(0)
    model = vitrim.create(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("metric", ["flops", "params"])
@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.25])
def test_budget_is_met_within_one_percent(wide_model, metric, ratio):
    data = random_set(wide_model.config)
    result = prune(wide_model, f"{metric}={ratio}", data, recover="none", calib_images=32, round_to=1,
                   progress=False)
    assert ratio * 0.99 <= result.kept_ratio <= ratio
    cost = CostModel(metric)
    assert result.pruned_cost == pytest.approx(cost.total(result.model.config))
    measured = sum(p.numel() for p in result.model.parameters())
    if metric == "params":
        assert measured == result.pruned_cost


def test_full_budget_is_identity(wide_model):
    data = random_set(wide_model.config)
    result = prune(wide_model, "flops=1.0", data, recover="none", calib_images=16, progress=False)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(result.model(x), wide_model(x))
    assert result.model.config == wide_model.config


def test_input_model_is_not_modified(wide_model):
    before = {k: v.clone() for k, v in wide_model.state_dict().items()}
    prune(wide_model, "flops=0.5", random_set(wide_model.config), recover="reconstruct", calib_images=16,
          progress=False)
    assert all(torch.equal(before[k], v) for k, v in wide_model.state_dict().items())


def test_structures_and_exclusions_are_respected(wide_model):
    data = random_set(wide_model.config)
    only_mlp = prune(wide_model, "flops=0.7", data, recover="none", structures="mlp", calib_images=16,
                     round_to=2, progress=False).model.config
    assert only_mlp.embed_dim == 32
    assert all(b.heads == 4 and b.qk_dim == 8 and b.v_dim == 8 and b.attention for b in only_mlp.blocks)
    assert any(b.mlp_dim < 64 for b in only_mlp.blocks)
    kept = prune(wide_model, "flops=0.6", data, recover="none", exclude=("blocks.0.*", "embed"),
                 calib_images=16, round_to=2, progress=False).model.config
    assert kept.blocks[0] == wide_model.config.blocks[0] and kept.embed_dim == 32


def test_impossible_budget_is_reported(wide_model):
    with pytest.raises(ConfigError, match="budget cannot be met"):
        prune(wide_model, "flops=0.05", random_set(wide_model.config), recover="none", structures="mlp",
              calib_images=16, progress=False)


@pytest.mark.parametrize("target, message", [
    ("flops=0", r"must be in \(0, 1\]"), ("flops=1.5", r"must be in \(0, 1\]"), ("flops=nan", r"in \(0, 1\]"),
    ("flops", "must look like"), ("energy=0.5", "unknown target metric"), ("flops=half", "not a number"),
])
def test_bad_targets(target, message):
    with pytest.raises(ConfigError, match=message):
        PruneConfig(target=target)


def test_bad_structures_and_recovery():
    with pytest.raises(ConfigError, match="unknown structure kind.*neurons"):
        PruneConfig(structures="heads,neurons")
    with pytest.raises(ConfigError, match="unknown recovery"):
        PruneConfig(recover="retrain")


def test_removed_sublayers_come_out_when_cheapest():
    """With only sub-layer removal allowed, a deep budget removes whole sub-layers."""
    torch.manual_seed(0)
    model = vitrim.create(uneven_config())
    result = prune(model, "flops=0.6", random_set(model.config), recover="none",
                   structures="attn-layer,mlp-layer", calib_images=16, progress=False)
    cfg = result.model.config
    assert sum((not b.attention) + (not b.mlp) for b in cfg.blocks) > 2
    assert result.kept_ratio <= 0.6


def test_reconstruction_moves_pruned_outputs_towards_dense(wide_model):
    data = random_set(wide_model.config, n=128)
    x = next(random_set(wide_model.config, n=32, seed=5).batches(32))[0]
    errors = {}
    for recover in ("none", "reconstruct"):
        pruned = prune(wide_model, "flops=0.5", data, recover=recover, calib_images=128, round_to=2,
                       progress=False).model
        with torch.no_grad():
            errors[recover] = (pruned(x) - wide_model(x)).pow(2).mean().item()
    assert errors["reconstruct"] < 0.5 * errors["none"]


def test_distillation_recoveries_move_outputs_towards_dense(wide_model):
    wide_model = copy.deepcopy(wide_model)
    with torch.no_grad():
        wide_model.head.weight.mul_(30)  # confident logits, so that pruning errors show in the KL
    data = random_set(wide_model.config, n=128)
    x = next(data.batches(64))[0]  # distillation images: the check is that the student learnt them
    outputs = {}
    for recover in ("none", "kd", "reconstruct", "reconstruct+kd"):
        torch.manual_seed(0)
        pruned = prune(wide_model, "flops=0.5", data, recover=recover, calib_images=128, round_to=2, kd_lr=1e-3,
                       kd_epochs=10, kd_batch_size=16, kd_alpha=1.0, progress=False).model  # random labels: not mixed in
        with torch.no_grad():
            outputs[recover] = pruned(x)
    with torch.no_grad():
        dense = wide_model(x).log_softmax(-1)
    kl = {k: torch.nn.functional.kl_div(v.log_softmax(-1), dense, log_target=True, reduction="batchmean").item()
          for k, v in outputs.items()}
    assert kl["kd"] < 0.5 * kl["none"]
    assert kl["reconstruct+kd"] < kl["reconstruct"] < kl["none"]


def test_distillation_mixes_in_the_labels_only_where_they_fit_the_model(wide_model):
    """kd_alpha None: the labels at half weight when they fit the head, else the teacher alone;
    an explicit kd_alpha below 1 that cannot be honoured is refused with the reason."""
    import dataclasses

    cfg = wide_model.config
    fitting = random_set(cfg, n=32)
    others = ImageSet(fitting.images, fitting.labels % 3, ["a", "b", "c"], cfg.mean, cfg.std)  # 3 classes, head of 4
    unlabelled = dataclasses.replace(fitting, labels=None)
    options = dict(recover="kd", calib_images=16, kd_images=16, kd_batch_size=16, progress=False)
    chosen = {name: prune(wide_model, "flops=0.7", data, **options).config
              for name, data in (("fitting", fitting), ("others", others))}
    assert (chosen["fitting"].kd_alpha, chosen["fitting"].kd_augment) == (0.5, "none")
    assert chosen["others"].kd_alpha == 1.0
    features = prune(wide_model, "flops=0.7", unlabelled, **options).config
    assert (features.objective, features.kd_alpha) == ("features", 1.0)
    assert prune(wide_model, "flops=0.7", fitting, recover="reconstruct", calib_images=16,
                 progress=False).config.kd_alpha is None  # no distillation: nothing decided
    for data, why in ((others, "classes"), (unlabelled, "features")):
        with pytest.raises(ConfigError, match=f"kd_alpha=0.5 .*{why}"):
            prune(wide_model, "flops=0.7", data, kd_alpha=0.5, **options)
    for bad in (dict(kd_alpha=1.5), dict(kd_alpha=float("nan")), dict(kd_augment="rotate")):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            PruneConfig(**bad)


def test_distillation_alpha_weighs_the_teacher_against_the_labels(wide_model, tmp_path):
    """alpha=1 follows the teacher alone, alpha=0 the labels alone: each ends closer to its own target."""
    from vitrim.prune.recover import distill

    teacher = copy.deepcopy(wide_model)
    with torch.no_grad():
        teacher.head.weight.mul_(30)
    data = random_set(teacher.config, n=64, seed=3)  # labels unrelated to the teacher
    x, y = next(data.batches(64))
    students = {}
    for alpha in (1.0, 0.0):
        torch.manual_seed(0)
        student = copy.deepcopy(wide_model)
        students[alpha] = distill(student, teacher, data, tmp_path / str(alpha), epochs=15, lr=3e-3, batch_size=16,
                                  progress=False, alpha=alpha)
    with torch.no_grad():
        dense = teacher(x).log_softmax(-1)
        kl = {a: torch.nn.functional.kl_div(s(x).log_softmax(-1), dense, log_target=True,
                                            reduction="batchmean").item() for a, s in students.items()}
        ce = {a: torch.nn.functional.cross_entropy(s(x), y).item() for a, s in students.items()}
    assert kl[1.0] < 0.5 * kl[0.0] and ce[0.0] < 0.8 * ce[1.0]
    with pytest.raises(ConfigError, match="alpha=1"):
        distill(copy.deepcopy(wide_model), teacher, data, tmp_path / "bad", objective="features", alpha=0.5,
                progress=False)


def test_pruned_model_round_trips(wide_model, tmp_path):
    pruned = prune(wide_model, "params=0.4", random_set(wide_model.config), recover="none", calib_images=16,
                   round_to=2, progress=False).model
    vitrim.save(pruned, tmp_path / "p")
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(vitrim.load(tmp_path / "p")(x), pruned(x))


def test_cli_prune_writes_model_and_report(capsys, tmp_path, wide_model):
    write_idx_dir(tmp_path / "data", n_train=64, n_test=16, size=16)
    cfg = wide_model.config.replace(num_classes=3, class_names=None)
    vitrim.save(vitrim.create(cfg, seed=0), tmp_path / "m")
    out = tmp_path / "pruned"
    code, stdout, err = run(capsys, "prune", str(tmp_path / "m"), "--data", f"idx:{tmp_path / 'data'}",
                            "--target", "flops=0.5", "--calib", "32", "--round-to", "2", "--runs", "2",
                            "--out", str(out), "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert 0.495 <= report["kept_ratio"] <= 0.5
    assert report["pruned"]["flops"] < report["dense"]["flops"]
    assert set(report["dense"]["latency"]) == {"1", "64"} and "accuracy" in report["pruned"]
    for name in ("report.json", "report.md", "plan.png"):
        assert (out / "report" / name).is_file()
    assert vitrim.load(out).config.embed_dim == report["pruned"]["embed_dim"]


@pytest.mark.parametrize("argv, message", [
    (["--target", "flops=2"], "must be in (0, 1]"),
    (["--structures", "heads,rows"], "unknown structure kind"),
    (["--target", "flops=0.01", "--structures", "mlp"], "budget cannot be met"),
])
def test_cli_prune_bad_input_exits_2_without_output(capsys, tmp_path, wide_model, argv, message):
    write_idx_dir(tmp_path / "data", n_train=64, n_test=16, size=16)
    vitrim.save(vitrim.create(wide_model.config.replace(num_classes=3), seed=0), tmp_path / "m")
    out = tmp_path / "never"
    code, _, err = run(capsys, "prune", str(tmp_path / "m"), "--data", f"idx:{tmp_path / 'data'}", "--calib", "16",
                       "--out", str(out), *argv)
    assert code == 2 and message in err and not out.exists()


def test_interpolation_is_exact_on_the_grid_and_linear_between():
    import numpy as np

    from vitrim.prune.latency import interpolate

    axes = [[8, 16, 32], [1, 3]]
    values = np.array([[1.0, 2.0], [3.0, 5.0], [7.0, 11.0]])
    assert interpolate(axes, values, (16, 3)) == 5.0
    assert interpolate(axes, values, (24, 1)) == pytest.approx(5.0)
    assert interpolate(axes, values, (12, 2)) == pytest.approx((1.5 + 4.0) / 2)
    assert interpolate(axes, values, (64, 3)) == 11.0  # clamped above the dense size


def test_latency_target_uses_a_cached_table(wide_model, tmp_path, monkeypatch):
    from vitrim.prune import latency

    monkeypatch.setenv("VITRIM_CACHE", str(tmp_path))
    calls = {"n": 0}
    real = latency.measure_table

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(latency, "measure_table", counting)
    monkeypatch.setattr(latency, "probe_ms", lambda table, device=None: {"attn": 1.0, "mlp": 2.0})
    table = latency.LatencyTable.for_model(wide_model, points=2, runs=2)
    again = latency.LatencyTable.for_model(wide_model, points=2, runs=2)
    assert calls["n"] == 1 and len(list((tmp_path / "latency").glob("*.json"))) == 1
    assert np_equal(table.attn_ms, again.attn_ms)
    cost = table.cost_model()
    dims = wide_model.config.blocks[0]
    small = type(dims)(heads=1, qk_dim=dims.qk_dim, v_dim=dims.v_dim, mlp_dim=dims.mlp_dim)
    assert cost.block(32, small, 17) > 0
    result = prune(wide_model, "latency=0.6", random_set(wide_model.config), recover="none", calib_images=16,
                   round_to=2, progress=False, cost=cost)
    assert result.metric == "latency" and result.kept_ratio <= 0.6


def test_a_latency_table_from_another_machine_state_is_measured_again(wide_model, tmp_path, monkeypatch):
    """The cached table's full-size sub-layers are re-timed: off by > 30%, or measured under load
    while the machine is idle now, the table is rebuilt with a warning naming why."""
    from vitrim.prune import latency

    monkeypatch.setenv("VITRIM_CACHE", str(tmp_path))
    now = {"attn": 1.0, "mlp": 2.0}
    monkeypatch.setattr(latency, "probe_ms", lambda table, device=None: dict(now))
    latency.LatencyTable.for_model(wide_model, points=2, runs=2)
    now["mlp"] = 3.0  # the MLP got 50% slower: another state of the machine
    with pytest.warns(UserWarning, match="full-size mlp sub-layer took 2.000 ms then and 3.000 ms now"):
        rebuilt = latency.LatencyTable.for_model(wide_model, points=2, runs=2)
    assert rebuilt.probe == {"attn": 1.0, "mlp": 3.0}
    path = next((tmp_path / "latency").glob("*.json"))
    saved = json.loads(path.read_text())
    saved["busy_cores"] = 1.5  # measured while another process kept a core busy
    path.write_text(json.dumps(saved))
    monkeypatch.setattr(latency, "busy_cores", lambda seconds=0.0: 0.0)  # the machine is idle now
    monkeypatch.setattr(latency.LoadProbe, "stop", lambda self, min_window=0.0: 0.0)
    with pytest.warns(UserWarning, match="kept 1.5 cores busy"):
        latency.LatencyTable.for_model(wide_model, points=2, runs=2)
    assert latency.staleness(latency.LatencyTable.from_dict(json.loads(path.read_text()))) is None


def np_equal(a, b):
    import numpy as np

    return bool(np.array_equal(a, b))


def test_round_to_auto_picks_the_smallest_multiple_that_gives_up_no_speed(wide_model):
    from vitrim.prune.roundto import choose_multiple

    # widths that are multiples of 8 run at full speed, the others pay for a partly empty vector
    times = {w: (w + (-w) % 8) * 0.01 for w in range(96, 129)}
    assert choose_multiple(times) == 8
    flat = {w: w * 0.01 for w in range(96, 129)}  # no preference: the finest granularity
    assert choose_multiple(flat) == 1
    result = prune(wide_model, "flops=0.6", random_set(wide_model.config), recover="none", calib_images=16,
                   round_to="auto", progress=False)
    assert result.config.round_to in (1, 8, 16, 32, 64)
    with pytest.raises(ConfigError, match="positive integer or 'auto'"):
        PruneConfig(round_to="fast")


class _FlopsTable:
    """A latency table stand-in whose cost is the FLOPs (the measured ratio is what the test sets)."""

    @classmethod
    def for_model(cls, *args, **kwargs):
        return cls()

    def cost_model(self):
        return CostModel("flops")


def test_a_latency_budget_is_met_as_measured(wide_model, monkeypatch):
    """The built model timed over the target: pruned further by the measured excess, then measured again."""
    from vitrim.prune import api, latency

    measured = iter([0.7, 0.49])
    seen = []

    def ratio(dense, pruned, batch, device):
        seen.append(CostModel("flops").total(pruned.config) / CostModel("flops").total(dense.config))
        return next(measured), None

    monkeypatch.setattr(latency, "LatencyTable", _FlopsTable)
    monkeypatch.setattr(api, "measured_latency_ratio", ratio)
    result = prune(wide_model, "latency=0.5", random_set(wide_model.config), recover="none", calib_images=16,
                   round_to=1, steps=1, progress=False)
    assert [s["step"] for s in result.steps] == [1, 2]
    assert seen[0] == pytest.approx(0.5, abs=0.01)  # the table's target met first
    assert seen[1] == pytest.approx(0.5 * 0.5 / 0.7, abs=0.01)  # then shrunk by the measured excess
    assert result.steps[-1]["measured_ratio"] == 0.49 and result.kept_ratio == pytest.approx(seen[1])


def test_latency_corrections_stop_at_their_limit_and_can_be_turned_off(wide_model, monkeypatch):
    from vitrim.prune import api, latency

    calls = []
    monkeypatch.setattr(latency, "LatencyTable", _FlopsTable)
    monkeypatch.setattr(api, "measured_latency_ratio", lambda *a: calls.append(1) or (0.9, None))
    data = random_set(wide_model.config)
    result = prune(wide_model, "latency=0.5", data, recover="none", calib_images=16, round_to=1, steps=1,
                   latency_corrections=2, progress=False)
    assert [s["step"] for s in result.steps] == [1, 2, 3] and len(calls) == 3  # 2 corrections, then measured
    assert result.steps[-1]["measured_ratio"] == 0.9
    calls.clear()
    plain = prune(wide_model, "latency=0.5", data, recover="none", calib_images=16, round_to=1, steps=1,
                  latency_corrections=0, progress=False)
    assert not calls and [s["step"] for s in plain.steps] == [1]
    logged = []
    monkeypatch.setattr(api, "measured_latency_ratio", lambda *a: (0.9, "runs spread widely"))
    noisy = prune(wide_model, "latency=0.5", data, recover="none", calib_images=16, round_to=1, steps=1,
                  progress=False, log=logged.append)
    assert [s["step"] for s in noisy.steps] == [1]  # an untrusted timing prunes nothing further
    assert any("not to be trusted (runs spread widely)" in line for line in logged)
    with pytest.raises(ConfigError, match=r"latency_corrections \(--latency-corrections\) must be >= 0"):
        PruneConfig(target="latency=0.5", latency_corrections=-1)
