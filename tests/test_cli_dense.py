"""Dense prediction from the command line: coco-synthetic, then train / eval / prune / bench on
``--data coco:DIR``, and one-line errors for bad input."""

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("pycocotools")

import vitrim  # noqa: E402
from vitrim.cli import main  # noqa: E402
from vitrim.models import VisionTransformer, uniform_config  # noqa: E402
from vitrim.models.dense import DenseModel  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")
FAST = ["--threads", "1"]
TRAIN = ["--model", "fmnist-vit-micro", "--epochs", "1", "--batch-size", "8", *FAST]


def run(argv, capsys):
    """``(exit code, stdout, stderr)`` of ``vitrim argv``."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_dense") / "coco"
    if FASHION.is_dir():
        assert main(["coco-synthetic", "--out", str(root), "--train", "24", "--val", "8", "--canvas", "32"]) == 0
    else:  # the writer on stand-in items: the CLI paths below are the same
        from tests.conftest import coco_items
        from vitrim.data.coco import write_synthetic_coco

        write_synthetic_coco(root, coco_items(20, 4), train=24, val=8, canvas=32, seed=0)
    return root


@pytest.fixture(scope="module")
def trained(coco, tmp_path_factory):
    """A segmenter and a detector trained for one epoch: task -> model directory."""
    out = tmp_path_factory.mktemp("trained")
    models = {}
    for task in ("segment", "detect"):
        models[task] = out / task
        assert main(["train", "--task", task, "--data", f"coco:{coco}", "--out", str(models[task]), *TRAIN]) == 0
    return models


@pytest.mark.skipif(not FASHION.is_dir(), reason="needs Fashion-MNIST (make data)")
def test_coco_synthetic_writes_the_layout_and_refuses_a_full_directory(coco, tmp_path, capsys):
    data = json.loads((coco / "annotations" / "instances_val.json").read_text())
    assert len(data["images"]) == 8 and len(list((coco / "train").glob("*.png"))) == 24
    assert [c["name"] for c in data["categories"]][:2] == ["T-shirt/top", "Trouser"]
    target = tmp_path / "set"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    code, _, err = run(["coco-synthetic", "--out", target, "--train", "2", "--val", "1"], capsys)
    assert code == 2 and "not empty" in err and "--force" in err and (target / "keep.txt").exists()
    code, out, _ = run(["coco-synthetic", "--out", target, "--train", "2", "--val", "1", "--canvas", "28", "--force"],
                       capsys)
    assert code == 0 and not (target / "keep.txt").exists() and "2 train and 1 val" in out
    code, _, err = run(["coco-synthetic", "--out", tmp_path / "small", "--canvas", "20"], capsys)
    assert code == 2 and "canvas >= 28" in err


@pytest.mark.parametrize("task, keys", [("segment", {"miou", "pixel_accuracy"}),
                                        ("detect", {"map", "ap50", "ap_small", "ap_medium", "ap_large"})])
def test_train_saves_a_dense_model_that_evaluates(trained, coco, task, keys, capsys):
    model = vitrim.load(trained[task])
    assert type(model) is DenseModel and model.dense.task == task and model.config.image_size == 32
    categories = len(json.loads((coco / "annotations" / "instances_train.json").read_text())["categories"])
    assert model.dense.num_classes == categories + (task == "segment")
    history = json.loads((trained[task] / "config.json").read_text())["training"]["history"]
    assert history[-1]["epoch"] == 1 and any(k.startswith("val_") for k in history[-1])
    code, out, _ = run(["eval", trained[task], "--data", f"coco:{coco}", "--json", *FAST], capsys)
    result = json.loads(out)
    assert code == 0 and keys <= set(result) and result["count"] == 8 and result["task"] == task
    code, out, _ = run(["eval", trained[task], "--data", f"coco:{coco}", *FAST], capsys)
    assert code == 0 and ("mAP@[.5:.95]" in out if task == "detect" else "mIoU" in out)


def test_train_starts_the_backbone_from_a_classifier(coco, tmp_path, capsys):
    """--init's weights, position embeddings resampled from its 28x28 input to the 32x32 canvas."""
    torch.manual_seed(0)
    classifier = VisionTransformer(uniform_config(2, 32, 2, image_size=28, patch_size=4, in_chans=1, num_classes=10,
                                                  mean=(0.3,), std=(0.4,)))
    vitrim.save(classifier, tmp_path / "clf")
    code, out, err = run(["train", "--task", "segment", "--data", f"coco:{coco}", "--init", tmp_path / "clf",
                          "--out", tmp_path / "seg", "--epochs", "1", "--batch-size", "8", "--lr", "1e-12", "--min-lr", "0",
                          "--no-eval", *FAST], capsys)
    assert code == 0, err
    model = vitrim.load(tmp_path / "seg")
    assert model.config.image_size == 32 and model.backbone.pos_embed.shape[1] == 1 + 64
    torch.testing.assert_close(model.backbone.blocks[1].mlp.fc1.weight, classifier.blocks[1].mlp.fc1.weight,
                               atol=1e-6, rtol=0)
    assert model.config.mean == (0.3,)
    code, _, err = run(["train", "--task", "segment", "--data", f"coco:{coco}", "--out", tmp_path / "new",
                        "--resume", *TRAIN], capsys)
    assert code == 2 and "holds no checkpoint/" in err


def test_prune_reports_backbone_and_whole_model_flops(trained, coco, tmp_path, capsys):
    code, out, err = run(["prune", trained["detect"], "--data", f"coco:{coco}", "--target", "flops=0.6",
                          "--out", tmp_path / "pruned", "--steps", "1", "--round-to", "2", "--json", *FAST], capsys)
    assert code == 0, err
    report = json.loads(out)
    dense, pruned = report["dense"], report["pruned"]
    assert pruned["backbone_flops"] / dense["backbone_flops"] <= 0.61
    assert pruned["flops"] == pruned["backbone_flops"] + pruned["head_flops"] and dense["head_flops"] == pruned["head_flops"]
    assert "map" in pruned and (tmp_path / "pruned" / "report" / "report.json").is_file()
    again = vitrim.load(tmp_path / "pruned")
    assert type(again) is DenseModel and again.config.blocks != vitrim.load(trained["detect"]).config.blocks
    code, _, err = run(["train", "--task", "detect", "--data", f"coco:{coco}", "--init", tmp_path / "pruned",
                        "--out", tmp_path / "tuned", "--epochs", "1", "--batch-size", "8", "--no-eval", *FAST], capsys)
    assert code == 0, err
    assert vitrim.load(tmp_path / "tuned").config.blocks == again.config.blocks  # fine-tuned as pruned
    code, _, err = run(["train", "--task", "segment", "--data", f"coco:{coco}", "--init", tmp_path / "pruned",
                        "--out", tmp_path / "other", *TRAIN], capsys)
    assert code == 2 and "is a detect model" in err
    code, out, _ = run(["prune", trained["segment"], "--data", f"coco:{coco}", "--target", "flops=0.7",
                        "--out", tmp_path / "seg", "--steps", "1", "--no-eval", *FAST], capsys)
    assert code == 0 and "whole-model FLOPs" in out and "block 0" in out
    code, out, err = run(["prune", trained["segment"], "--data", f"coco:{coco}", "--target", "flops=0.7",
                          "--recover", "reconstruct+kd", "--epochs", "1", "--out", tmp_path / "seg-kd", "--steps", "1",
                          "--no-eval", "--json", *FAST], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["config"]["recover"] == "reconstruct+kd" and report["kept_ratio"] <= 0.7
    assert vitrim.load(tmp_path / "seg-kd").config.blocks == vitrim.load(tmp_path / "seg").config.blocks


@pytest.mark.parametrize("task, metric", [("segment", "miou"), ("detect", "map")])
def test_tokens_on_a_dense_model_unmerge_for_the_head(trained, coco, task, metric, capsys):
    code, out, err = run(["tokens", trained[task], "--data", f"coco:{coco}", "--sweep", "1,0.5", "--layers", "0",
                          "--runs", "2", "--json", *FAST], capsys)
    assert code == 0, err
    report = json.loads(out)
    full, half = report["rows"]
    assert report["task"] == task and sorted(full["latency"]) == ["1", "8"]  # dense batches by default
    assert full["metrics"][metric] == pytest.approx(report["dense"]["metrics"][metric], abs=1e-6)
    assert full["backbone_flops_ratio"] == pytest.approx(1.0)
    assert half["backbone_flops_ratio"] < half["flops_ratio"] < 1.0  # the head's FLOPs stay
    code, out, _ = run(["tokens", trained[task], "--data", f"coco:{coco}", "--keep", "0.5", "--runs", "2",
                        "--batch", "1", *FAST], capsys)
    assert code == 0 and "tokens restored to the full grid" in out and "speedup b=1" in out
    code, out, err = run(["tokens", trained[task], "--no-eval", "--keep", "0.5", "--runs", "2", "--batch", "1",
                          "--json", *FAST], capsys)  # no data: FLOPs and speed only
    assert code == 0, err
    (row,) = json.loads(out)["rows"]
    assert "metrics" not in row and row["backbone_flops_ratio"] == pytest.approx(half["backbone_flops_ratio"])


@pytest.mark.parametrize("task, metric, quant", [("segment", "miou", "w8a8"), ("detect", "map", "w8-dynamic")])
def test_compress_stacks_the_levers_on_a_dense_model(trained, coco, task, metric, quant, tmp_path, capsys):
    """Prune by the task loss, merge and restore tokens, export and quantize: each stage scored on
    the val split, the pruned model saved, the exported one agreeing with its PyTorch original."""
    from vitrim.data.coco import load_coco
    from vitrim.dense.train import evaluate_dense

    out = tmp_path / "stacked"
    code, text, err = run(["compress", trained[task], "--data", f"coco:{coco}", "--prune", "flops=0.7",
                           "--tokens", "keep=0.6", "--layers", "0", "--quant", quant, "--calib", "8",
                           "--prune-calib", "16", "--runs", "2", "--out", out, "--json", *FAST], capsys)
    assert code == 0, err
    report = json.loads(text)
    stages = report["stages"]
    names = [s["stage"] for s in stages]
    assert names[:3] == ["torch fp32 dense", "torch fp32 pruned", "+ tokens (tome keep=0.6, restored)"]
    assert names[3] == "ORT fp32" and names[4].startswith(f"ORT {quant}")
    assert report["task"] == task and report["score"] == metric and report["batches"] == [1, 8]
    assert all(metric in s["metrics"] and sorted(s["latency"]) == ["1", "8"] for s in stages)
    assert stages[1]["kept_ratio"] <= 0.7 and stages[0]["flops"] > stages[1]["flops"] > stages[2]["flops"]
    assert stages[2]["flops"] == stages[3]["flops"] == stages[4]["flops"]
    assert stages[3]["check"]["max_abs_diff"] < 1e-3  # ONNX fp32 against the token-reduced PyTorch model
    assert stages[3]["metrics"][metric] == pytest.approx(stages[2]["metrics"][metric], abs=0.02)
    assert stages[0]["speedup_b1"] == 1.0 and stages[4]["size_bytes"] < stages[3]["size_bytes"] / 2
    assert stages[2]["drop_points"] == pytest.approx((stages[0][metric] - stages[2][metric]) * 100)
    pruned = vitrim.load(out / "pruned")
    assert type(pruned) is DenseModel and pruned.dense.task == task
    val = load_coco(coco, "val", pruned.config.image_size, pruned.config.in_chans).for_model(pruned.config)
    assert evaluate_dense(pruned, val)[metric] == pytest.approx(stages[1][metric], abs=1e-6)
    assert (out / f"model-{quant}.onnx").is_file() and (out / "report.md").is_file()
    assert {"mAP", "mIoU"} & set((out / "report.md").read_text().split()), "the task's metric heads the table"


@pytest.mark.parametrize("task", ["segment", "detect"])
def test_export_checks_a_dense_model_on_its_own_images(trained, coco, task, tmp_path, capsys):
    code, out, err = run(["export", trained[task], "--data", f"coco:{coco}", "--out", tmp_path / "dense.onnx",
                          "--check-images", "4", "--json", *FAST], capsys)
    assert code == 0, err
    check = json.loads(out)["check"]
    assert check["images"] == 4 and check["top1_agreement"] == 1.0 and check["max_abs_diff"] < 1e-3


def test_export_agreement_counts_a_detectors_class_channels_only():
    from vitrim.quant.check import compare

    x = torch.zeros(2, 1, 4, 4)
    reference = torch.zeros(2, 3 + 4, 4, 4)
    reference[:, 0] = 1.0  # class 0 everywhere; the box channels hold larger values
    reference[:, 3:] = 5.0
    candidate = reference.clone()
    candidate[:, 3:] = torch.arange(4.0).view(1, 4, 1, 1) * 10  # other box values: the top box channel moves
    candidate[1, 1, :2] = 2.0  # image 1: class 1 wins in half of the positions
    agreement = compare(lambda _: reference, lambda _: candidate, [x], reference_name="r", classes=3)
    assert agreement.top1_agreement == pytest.approx(0.75)
    assert compare(lambda _: reference, lambda _: reference, [x], reference_name="r", classes=3).top1_agreement == 1


def test_bench_times_the_whole_model_or_its_backbone(trained, capsys):
    results = {}
    for extra in ([], ["--backbone"]):
        code, out, err = run(["bench", trained["detect"], "--runs", "2", "--batch", "1", "--json", *FAST, *extra],
                             capsys)
        assert code == 0, err
        results[bool(extra)] = json.loads(out)
    whole, backbone = results[False], results[True]
    assert whole["timed"] == "whole dense model" and backbone["timed"] == "backbone"
    assert whole["flops"] == whole["backbone_flops"] + whole["head_flops"] > backbone["flops"]
    assert whole["params"] > backbone["params"]


@pytest.mark.parametrize("change, message", [
    (lambda d, r: (r / "annotations" / "instances_val.json").unlink(), "has no annotations/instances_val.json"),
    (lambda d, r: d["annotations"][0].update(bbox=[30, 30, 10, 10]), r"annotations\[0\] \(id 1\) has bbox"),
    (lambda d, r: (r / "val" / d["images"][0]["file_name"]).unlink(), "which is missing; copy the images"),
])
def test_bad_coco_data_is_one_line_and_exit_2(trained, coco, tmp_path, change, message, capsys):
    import re

    root = tmp_path / "broken"
    shutil.copytree(coco, root)
    path = root / "annotations" / "instances_val.json"
    data = json.loads(path.read_text())
    change(data, root)
    if path.exists():  # the first case removed it
        path.write_text(json.dumps(data))
    code, _, err = run(["eval", trained["segment"], "--data", f"coco:{root}", *FAST], capsys)
    assert code == 2 and re.search(message, err) and err.count("\n") == 1, err
    assert "instances_val.json" in err or "annotations" in err


def test_bad_combinations_are_refused(trained, coco, tmp_path, capsys):
    cases = [
        (["train", "--task", "detect", "--data", "fashion-mnist", "--out", tmp_path / "x", *TRAIN], "--data coco:DIR"),
        (["train", "--data", f"coco:{coco}", "--out", tmp_path / "x", *TRAIN], "pass --task segment or --task detect"),
        (["eval", "fmnist-vit", "--data", f"coco:{coco}"], "not a detector or segmenter"),
        (["eval", trained["detect"], "--limit", "8"], "vitrim eval needs its task's data: --data coco:DIR"),
        (["prune", trained["detect"], "--out", tmp_path / "p"], "--data coco:DIR"),
        (["prune", "fmnist-vit", "--data", f"coco:{coco}", "--out", tmp_path / "p"], "not a detector or segmenter"),
        (["bench", "fmnist-vit-micro", "--backbone", "--runs", "1"], "--backbone times a dense model's backbone"),
        (["eval", trained["detect"], "--data", f"coco:{coco}", "--val-split", "val2017"],
         "has no annotations/instances_val2017.json"),
        (["eval", trained["detect"], "--data", f"coco:{tmp_path / 'none'}"], "does not exist"),
        (["tokens", "fmnist-vit", "--data", f"coco:{coco}"], "not a detector or segmenter"),
        (["tokens", trained["segment"], "--limit", "8"], "vitrim tokens needs its task's data: --data coco:DIR"),
        (["compress", trained["segment"], "--data", f"coco:{coco}", "--target", "latency=0.5", "--out", tmp_path / "c"],
         "give the levers: --prune flops=R"),
        (["compress", trained["segment"], "--data", f"coco:{coco}", "--calib-method", "blockwise", "--out",
          tmp_path / "c"], "use --calib-method minmax"),
        (["compress", trained["segment"], "--out", tmp_path / "c"], "--data coco:DIR"),
        (["compress", "fmnist-vit", "--data", f"coco:{coco}", "--out", tmp_path / "c"], "not a detector or segmenter"),
    ]
    for argv, message in cases:
        code, _, err = run(argv, capsys)
        assert code == 2 and message in err and err.count("\n") == 1, (argv, err)
