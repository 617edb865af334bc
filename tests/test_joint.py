import dataclasses
import json

import pytest
import torch

import vitrim
from tests.test_cli import run
from tests.test_data import write_idx_dir
from vitrim.compress import CompressConfig
from vitrim.data import load_idx_dir
from vitrim.errors import ConfigError
from vitrim.joint import Candidate, JointConfig, parse_joint_target, plan_joint, rank, resolve_layers
from vitrim.models import uniform_config


def small_model(seed: int = 0):
    cfg = uniform_config(4, 32, 2, 2.0, image_size=16, patch_size=2, in_chans=1, num_classes=3,
                         mean=(0.5,), std=(0.25,))
    model = vitrim.create(cfg, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture
def data_dir(tmp_path):
    write_idx_dir(tmp_path / "data", n_train=200, n_test=16, size=16)
    return tmp_path / "data"


def test_joint_target_and_grid_checks():
    assert parse_joint_target("latency=0.15") == ("latency", 0.15)
    for bad, message in (("speed=0.5", "must look like"), ("latency=2", r"\(0, 1\]"), ("flops=x", "not a number"),
                         ("latency", "must look like")):
        with pytest.raises(ConfigError, match=message):
            parse_joint_target(bad)
    with pytest.raises(ConfigError, match="unknown precision"):
        JointConfig(precisions=("fp32", "int3"))
    with pytest.raises(ConfigError, match="keeps must be ratios"):
        JointConfig(keeps=(1.0, 1.5))
    with pytest.raises(ConfigError, match="prune_loss"):
        JointConfig(prune_loss="guess")
    with pytest.raises(ConfigError, match="min_seconds"):
        JointConfig(min_seconds=-1.0)
    assert resolve_layers(None, 12) == (4, 8) and resolve_layers("early", 12) == (1, 4, 7, 10)
    with pytest.raises(ConfigError, match="between 0 and 3"):
        resolve_layers((5,), 4)


def test_rank_keeps_the_budget_and_minimises_the_summed_loss():
    def cand(loss_prune, loss_tokens, loss_quant, cost):
        return Candidate(0.5, 0.7, (1,), "fp32", loss_prune, loss_tokens, loss_quant, cost)

    over = cand(0.0, 0.0, 0.0, 0.31)  # the most accurate, but over the budget
    best = cand(0.01, 0.02, 0.0, 0.29)
    worse = cand(0.03, 0.0, 0.01, 0.10)
    tie_cheaper = cand(0.02, 0.01, 0.0, 0.20)
    ranked = rank([over, worse, best, tie_cheaper], 0.30)
    assert over not in ranked
    assert ranked == [tie_cheaper, best, worse]  # equal loss 0.03: the cheaper first
    assert best.loss == pytest.approx(0.03)


def test_latency_choice_is_settled_by_timing_the_built_candidates(monkeypatch):
    """Ranked by loss, the first measured within the budget wins; when none is predicted within
    it the cheapest are timed (the prediction sums parts timed apart) and the most accurate that
    meets it wins; a first timing under the budget or less than 25% over it only selects: three
    fresh timings follow and their median counts; nothing within: the fastest measured, and the
    plan says so."""
    import vitrim.joint as joint
    from vitrim.joint import Levers, choose, plan_table

    def cand(keep, loss, predicted):
        return Candidate(1.0, keep, (1,), "fp32", 0.0, loss, 0.0, predicted)

    cands = [cand(0.5, 0.05, 0.35), cand(0.6, 0.02, 0.36), cand(0.7, 0.01, 0.40), cand(0.8, 0.001, 0.45)]
    measured = {0.5: 0.26, 0.6: 0.29, 0.7: 0.40, 0.8: 0.70}
    again: dict[float, list[float]] = {}  # keep -> what its second to fourth timings give
    timed, built = [], []

    def fake(candidate, levers, work):
        built.append(candidate.keep)

        def timer():
            timed.append(candidate.keep)
            n = timed.count(candidate.keep)
            later = again.get(candidate.keep)
            return later[n - 2] if n > 1 and later else measured[candidate.keep]

        return timer

    monkeypatch.setattr(joint, "measure_candidate", fake)
    levers = Levers(None, JointConfig(target="latency=0.3", verify=3), {}, cands, {}, None)
    plan = choose(levers, 0.3)  # none predicted within 0.3: the three cheapest timed, 0.6 the most accurate inside
    # 0.26 and 0.29 are under 0.3, so each was timed three more times (built once); 0.40 is 33% over
    assert plan.met and plan.chosen.keep == 0.6 and plan.chosen.measured == 0.29
    assert timed == [0.5] * 4 + [0.6] * 4 + [0.7] and built == [0.5, 0.6, 0.7]
    timed.clear()
    again[0.6] = [0.31, 0.32, 0.28]  # the first timing was the lucky one: the median is over the budget
    plan = choose(levers, 0.3)
    assert plan.met and plan.chosen.keep == 0.5 and timed == [0.5] * 4 + [0.6] * 4 + [0.7]
    assert {c.keep: c.measured for c in [plan.chosen, *plan.runner_ups]}[0.6] == 0.31
    timed.clear()
    again[0.6] = [0.31, 0.30, 0.305]  # with the selecting 0.29 the median would be 0.30: it does not count
    plan = choose(levers, 0.3)
    assert plan.chosen.keep == 0.5
    assert {c.keep: c.measured for c in [plan.chosen, *plan.runner_ups]}[0.6] == 0.305
    timed.clear()
    again[0.6] = [0.31, 0.28, 0.29]  # one noisy timing over the budget does not rule it out
    plan = choose(levers, 0.3)
    assert plan.met and plan.chosen.keep == 0.6 and plan.chosen.measured == 0.29
    timed.clear()
    plan = choose(levers, 0.2)
    assert not plan.met and plan.chosen.keep == 0.5
    assert plan_table(plan).endswith("no setting met latency=0.2: the chosen one is the fastest measured (0.260); "
                                      "try a budget near that, or widen --prune-ratios / --keeps")
    timed.clear()
    plan = choose(levers, 0.5)  # all predicted within: by loss, 0.8 is over as built, 0.7 meets it
    assert plan.met and plan.chosen.keep == 0.7 and timed == [0.8] + [0.7] * 4
    timed.clear()
    # ranked by loss, a first timing near the budget is confirmed before the search stops
    again[0.7] = [0.42, 0.43, 0.41]
    plan = choose(levers, 0.4)
    assert plan.met and plan.chosen.keep == 0.6 and timed == [0.7] * 4 + [0.6] * 4
    timed.clear()
    measured[0.7], again[0.7] = 0.41, [0.38, 0.45, 0.39]  # first timing just over, two of three fresh under: it fits
    plan = choose(levers, 0.4)
    assert plan.met and plan.chosen.keep == 0.7 and plan.chosen.measured == 0.39 and timed == [0.7] * 4


def test_optimistic_predictions_are_corrected_by_the_timed_candidates(monkeypatch):
    """When every candidate timed is over the budget, their median measured/predicted corrects
    the untimed ones' predictions and a second round times the best of those then inside."""
    import vitrim.joint as joint
    from vitrim.joint import Levers, choose

    def cand(keep, loss, predicted):
        return Candidate(1.0, keep, (1,), "fp32", 0.0, loss, 0.0, predicted)

    # predicted 0.30-0.40 for a 0.4 budget, but every setting measures 1.3x its prediction
    cands = [cand(0.9, 0.001, 0.40), cand(0.8, 0.002, 0.38), cand(0.7, 0.01, 0.36), cand(0.6, 0.02, 0.30),
             cand(0.5, 0.05, 0.29), cand(0.4, 0.09, 0.25), cand(0.45, 0.1, 0.26)]
    timed: list[float] = []

    def fake(candidate, levers, work):
        def timer():
            timed.append(candidate.keep)
            return 0.28 if candidate.keep == 0.45 else round(candidate.predicted * 1.3, 4)  # 0.45: barely biased

        return timer

    monkeypatch.setattr(joint, "measure_candidate", fake)
    levers = Levers(None, JointConfig(target="latency=0.4", verify=2), {}, cands, {}, None)
    lines: list[str] = []
    plan = choose(levers, 0.4, log=lines.append)
    # round 1: 0.9 (0.52) and 0.8 (0.494) are over; the bias 1.3 leaves 0.6 (0.39) and 0.5, 0.4 inside
    assert plan.met and plan.chosen.keep == 0.6 and plan.chosen.measured == pytest.approx(0.39)
    # 0.494 and 0.39 are near the budget: each selected, then timed three more times
    assert timed == [0.9] + [0.8] * 4 + [0.6] * 4
    assert any("1.30x their prediction" in line for line in lines)
    assert [c.keep for c in plan.runner_ups][:2] == [0.9, 0.8]
    timed.clear()
    lines.clear()
    # 0.3: 0.6 and 0.5 time over; corrected by 1.3 nothing untimed is inside, so the cheapest
    # untimed are timed: 0.4 (0.325, over) and 0.45 (0.28, inside), and the most accurate inside wins
    plan = choose(levers, 0.3, log=lines.append)
    assert plan.met and plan.chosen.keep == 0.45 and plan.chosen.measured == 0.28
    assert timed == [0.6, 0.5] + [0.4] * 4 + [0.45] * 4
    assert any("cheapest settings not yet timed" in line for line in lines)
    timed.clear()
    plan = choose(levers, 0.2)  # nothing measures inside: the fastest of all timed, and not met
    assert not plan.met and plan.chosen.keep == 0.45 and plan.chosen.measured == 0.28


def test_candidates_are_timed_with_the_dense_weights_sliced_by_their_plan():
    """The model a candidate is timed as: the dense model's own weights cut by the plan (not a
    fresh initialisation), the dense model itself at ratio 1, token reduction a view on it."""
    from vitrim.joint import dimension_plans, shaped, sliced
    from vitrim.prune.surgery import slice_model

    torch.manual_seed(0)
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = [(torch.randn(8, 1, 16, 16), torch.randint(0, 3, (8,))) for _ in range(2)]
    plans = dimension_plans(model, calib, [1.0, 0.5], round_to=1)
    assert sliced(model, plans, 1.0) is model
    cut = sliced(model, plans, 0.5)
    expected = slice_model(model, plans[0.5][1]).state_dict()
    assert cut.config == plans[0.5][0] and not cut.training
    assert all(torch.equal(v, expected[k]) for k, v in cut.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the dense model is untouched
    fresh = vitrim.create(plans[0.5][0], seed=0).state_dict()
    assert not torch.equal(cut.state_dict()["head.weight"], fresh["head.weight"])
    reduced = shaped(cut, 0.7, (1,), "tome")
    assert reduced.model is cut and shaped(cut, 1.0, (1,), "tome") is cut


def test_flops_budget_is_met_by_the_chosen_combination(data_dir):
    torch.set_num_threads(1)
    model = small_model()
    train = load_idx_dir(data_dir, "train", name="tiny")
    cfg = JointConfig(target="flops=0.4", prune_ratios=(1.0, 0.8, 0.6, 0.4), keeps=(1.0, 0.7, 0.5),
                      layer_sets=(None, (0,)), precisions=("fp32",), calib=64, eval_images=96)
    plan = plan_joint(model, train, cfg, progress=False)
    assert plan.met and plan.chosen.predicted <= 0.4
    inside = [plan.chosen, *plan.runner_ups]
    assert all(c.predicted <= 0.4 for c in inside)
    assert [c.loss for c in inside] == sorted(c.loss for c in inside)
    # the token curve was measured (not assumed): keep 0.5 changes the calibration loss
    assert any(abs(t["loss"]) > 0 for t in plan.curves["tokens"] if t["keep"] < 1)
    assert plan.curves["prune"]["1.0"] == 0.0 and plan.curves["prune"]["0.4"] != 0.0
    # the plan that was costed is the one a pipeline builds: applied as is, then reconstructed
    ratio = max(r for r in cfg.prune_ratios if r < 1)
    searched = plan_joint(model, train, dataclasses.replace(cfg, prune_ratios=(ratio,), keeps=(1.0,)),
                          progress=False).dimension_plan
    result = vitrim.prune(model, f"flops={ratio}", train, plan=searched, recover="reconstruct", calib_images=32,
                          progress=False)
    assert result.model.config == searched.pruned_config(model.config)
    assert result.steps == [{"step": 1, "kept_ratio": result.kept_ratio, "removed": {}, "plan": "given"}]
    with pytest.raises(ConfigError, match="the given plan removes .*search the plan with those structures"):
        vitrim.prune(model, "flops=0.5", train, plan=searched, structures=("attn_layer",))
    with pytest.raises(ConfigError, match="plan has 3 blocks but the model has 4"):
        vitrim.prune(model, "flops=0.5", train, plan=dataclasses.replace(searched, blocks=searched.blocks[:3]))


def test_cli_compress_with_a_joint_latency_budget(capsys, tmp_path, data_dir, monkeypatch):
    import sys

    prune_module = sys.modules["vitrim.prune"]  # the package (vitrim.prune is also the function)
    torch.set_num_threads(1)
    given = []
    real_prune = prune_module.prune

    def spy(*args, **kwargs):
        given.append(kwargs.get("plan"))
        return real_prune(*args, **kwargs)

    monkeypatch.setattr(prune_module, "prune", spy)
    vitrim.save(small_model(), tmp_path / "m")
    out = tmp_path / "c"
    code, stdout, err = run(capsys, "compress", str(tmp_path / "m"), "--data", f"idx:{data_dir}",
                            "--target", "latency=0.9", "--prune-ratios", "1,0.5", "--keeps", "1,0.6",
                            "--precisions", "fp32,w8-dynamic", "--joint-calib", "48", "--joint-eval", "64",
                            "--prune-calib", "48", "--calib", "16", "--runs", "3", "--threads", "1",
                            "--joint-seconds", "0", "--out", str(out), "--json")
    assert code == 0, err
    report = json.loads(stdout)
    joint = report["joint"]
    chosen = joint["chosen"]
    assert chosen["measured"] is not None  # the choice was built and timed, not only predicted
    assert joint["met"] == (chosen["measured"] <= 0.9)
    assert chosen["loss"] == pytest.approx(chosen["loss_prune"] + chosen["loss_tokens"] + chosen["loss_quant"])
    # the pipeline ran the chosen levers
    assert report["config"]["prune"] == (None if chosen["prune_ratio"] >= 1 else f"flops={chosen['prune_ratio']:g}")
    assert report["config"]["quant"] == (None if chosen["precision"] == "fp32" else chosen["precision"])
    if chosen["prune_ratio"] < 1:  # the pipeline built the very plan the search timed
        assert len(given) == 1 and given[0] is not None
        saved = json.loads((out / "pruned" / "config.json").read_text())["config"]
        assert saved["embed_dim"] == len(given[0].embed)
        assert [b["mlp_dim"] for b in saved["blocks"]] == [len(b.mlp) if b.mlp_on else 0 for b in given[0].blocks]
    text = (out / "report.md").read_text()
    assert "Joint choice for latency=0.9" in text and "chosen" in text


def test_cli_target_refuses_fixed_levers_and_bad_budgets_before_any_work(capsys, tmp_path, data_dir):
    vitrim.save(small_model(), tmp_path / "m")
    for extra, message in ((["--prune", "flops=0.6"], "drop --prune"), (["--layers", "1"], "drop --layers"),
                           (["--target", "speed=0.3"], "must look like latency=0.15"),
                           (["--keeps", "1,2"], "keeps must be ratios"),
                           (["--joint-eval", "5000"], "joint search images")):
        args = ["--target", "latency=0.3"] if "--target" not in extra else []
        code, _, err = run(capsys, "compress", str(tmp_path / "m"), "--data", f"idx:{data_dir}",
                           "--prune-calib", "48", "--calib", "16", "--joint-calib", "48", "--joint-eval", "64",
                           "--out", str(tmp_path / "c"), *args, *extra)
        assert code == 2 and message in err and err.count("\n") == 1, (extra, err)
        assert not (tmp_path / "c").exists()


def test_flops_target_keeps_the_given_precision():
    cfg = CompressConfig(target="flops=0.3", quant="w8a8")
    assert cfg.joint.precisions == ("w8a8",) and cfg.joint.ratio == 0.3
    assert CompressConfig(target="flops=0.3", quant=None).joint.precisions == ("fp32",)


def test_unreachable_flops_budget_names_the_cheapest_setting_and_the_fix():
    from vitrim.joint import Levers, choose, plan_table

    cands = [Candidate(r, 1.0, (1,), "fp32", 0.1 / r, 0.0, 0.0, r) for r in (1.0, 0.5, 0.3)]
    plans = {r: (None, f"plan at {r}", 0.0) for r in (0.5, 0.3)}
    plan = choose(Levers(None, JointConfig(target="flops=0.1"), plans, cands, {}, None))
    assert not plan.met and plan.chosen.prune_ratio == 0.3 and plan.dimension_plan == "plan at 0.3"
    assert plan_table(plan).endswith("no setting met flops=0.1: the chosen one is the cheapest on the grids (0.300); "
                                      "widen --prune-ratios / --keeps")
