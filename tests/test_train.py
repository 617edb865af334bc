import json

import pytest
import torch

import vitrim
from vitrim.data.dataset import ImageSet
from vitrim.errors import ConfigError, ModelFileError
from vitrim.train import TrainConfig, fit
from vitrim.train.loop import CHECKPOINT_DIR


def toy_set(n=96, seed=0):
    """Three classes told apart by which third of the image is bright."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.randint(0, 60, (n, 1, 16, 16), generator=g, dtype=torch.uint8)
    for i, y in enumerate(labels.tolist()):
        images[i, :, :, y * 5 : y * 5 + 5] += 150
    return ImageSet(images, labels, ["a", "b", "c"], (0.3,), (0.3,), name="toy")


def micro():
    from tests.conftest import uneven_config

    torch.manual_seed(0)
    return vitrim.create(uneven_config(num_classes=3, mean=(0.3,), std=(0.3,)), seed=0)


def fast(**kw):
    return TrainConfig(**{"epochs": 3, "batch_size": 16, "lr": 3e-3, "warmup_epochs": 0.5,
                          "precision": "fp32", "augment": False, **kw})


def test_training_learns_and_checkpoints(tmp_path):
    result = fit(micro(), toy_set(), fast(epochs=6), tmp_path, test_set=toy_set(seed=1), progress=False)
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4, 5, 6]
    assert result.history[-1]["test_accuracy"] >= 0.9
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    state = json.loads((tmp_path / CHECKPOINT_DIR / "trainer.json").read_text())
    assert state["epoch"] == 6


def test_same_seed_same_weights(tmp_path):
    a = fit(micro(), toy_set(), fast(epochs=1), tmp_path / "a", progress=False).model
    b = fit(micro(), toy_set(), fast(epochs=1), tmp_path / "b", progress=False).model
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_resume_matches_an_uninterrupted_run(tmp_path):
    full = fit(micro(), toy_set(), fast(), tmp_path / "full", progress=False).model

    stopped = {"epochs": 0}

    class Stop(Exception):
        pass

    def stop_after_two(model, record):
        stopped["epochs"] = record["epoch"]
        if record["epoch"] == 2:
            raise Stop

    with pytest.raises(Stop):
        fit(micro(), toy_set(), fast(), tmp_path / "part", progress=False, on_epoch_end=stop_after_two)
    resumed = fit(micro(), toy_set(), fast(), tmp_path / "part", resume=True, progress=False)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    for pa, pb in zip(full.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0)


def test_resume_without_checkpoint_is_reported(tmp_path):
    with pytest.raises(ModelFileError, match="start without --resume"):
        fit(micro(), toy_set(), fast(), tmp_path, resume=True, progress=False)


def test_distillation_pulls_student_towards_teacher(tmp_path):
    from vitrim.train.loop import distillation_loss

    teacher = fit(micro(), toy_set(), fast(epochs=6), tmp_path / "t", progress=False).model
    x = next(toy_set(seed=2).batches(96))[0]
    student = micro()
    with torch.no_grad():
        before = distillation_loss(student(x), teacher(x), 1.0).item()
    fit(student, toy_set(), fast(epochs=3, distill_alpha=1.0), tmp_path / "s", teacher=teacher, progress=False)
    with torch.no_grad():
        after = distillation_loss(student(x), teacher(x), 1.0).item()
    assert after < 0.3 * before


def test_bf16_training_runs(tmp_path):
    result = fit(micro(), toy_set(), fast(epochs=1, precision="bf16"), tmp_path, progress=False)
    assert torch.isfinite(torch.tensor(result.history[0]["train_loss"]))


def test_fp16_training_scales_the_loss_learns_and_resumes_its_scaler(tmp_path):
    cfg = fast(epochs=4, precision="fp16")
    full = fit(micro(), toy_set(), cfg, tmp_path / "full", test_set=toy_set(seed=1), progress=False)
    assert full.history[-1]["test_accuracy"] >= 0.9  # as fp32 learns this set (test above)
    scaler = json.loads((tmp_path / "full" / CHECKPOINT_DIR / "trainer.json").read_text())["grad_scaler"]
    assert scaler["scale"] > 1 and scaler["_growth_tracker"] > 0  # the loss really was scaled, step by step

    class Stop(Exception):
        pass

    def stop_after_two(model, record):
        if record["epoch"] == 2:
            raise Stop

    with pytest.raises(Stop):
        fit(micro(), toy_set(), cfg, tmp_path / "part", progress=False, on_epoch_end=stop_after_two)
    resumed = fit(micro(), toy_set(), cfg, tmp_path / "part", resume=True, progress=False)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    again = json.loads((tmp_path / "part" / CHECKPOINT_DIR / "trainer.json").read_text())["grad_scaler"]
    assert again == scaler  # the scaler continued from its checkpoint (a fresh one counts from zero)
    for pa, pb in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(lr=-1.0), dict(precision="fp8"), dict(label_smoothing=1.0)])
def test_bad_training_settings(bad):
    with pytest.raises(ConfigError, match="invalid training setting"):
        TrainConfig(**bad)


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(lr=1.0, min_lr=0.0, warmup_epochs=1)
    lrs = [cfg.lr_at(s, 100, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] < 0.01
