import json

import pytest

import vitrim
from tests.test_data import write_idx_dir
from vitrim.cli import main
from vitrim.models import uniform_config


def run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse refuses bad option values itself
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def idx_model(tmp_path):
    """A tiny model and an 8x8 MNIST-format dataset it fits."""
    write_idx_dir(tmp_path / "data", n_train=40, n_test=12, size=8)
    cfg = uniform_config(1, 16, 2, 2.0, image_size=8, patch_size=4, in_chans=1, num_classes=3,
                         mean=(0.5,), std=(0.5,))
    vitrim.save(vitrim.create(cfg, seed=0), tmp_path / "model")
    return tmp_path


def test_eval_json(capsys, idx_model):
    code, out, _ = run(capsys, "eval", str(idx_model / "model"), "--data", f"idx:{idx_model / 'data'}", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["count"] == 12 and 0.0 <= result["accuracy"] <= 1.0


def test_eval_matches_python_api(capsys, idx_model):
    from vitrim.data import load_dataset

    model = vitrim.load(idx_model / "model")
    expected = vitrim.evaluate(model, load_dataset(f"idx:{idx_model / 'data'}", "test"))
    _, out, _ = run(capsys, "eval", str(idx_model / "model"), "--data", f"idx:{idx_model / 'data'}", "--json")
    assert json.loads(out)["accuracy"] == expected["accuracy"]


def test_bench_json_has_params_flops_latency(capsys, idx_model):
    code, out, _ = run(capsys, "bench", str(idx_model / "model"), "--batch", "1", "--batch", "4",
                       "--runs", "3", "--threads", "1", "--json")
    assert code == 0
    result = json.loads(out)
    model = vitrim.load(idx_model / "model")
    assert result["params"] == sum(p.numel() for p in model.parameters())
    assert result["flops"] > 0 and set(result["latency"]) == {"1", "4"}
    assert result["latency"]["4"]["median_ms"] > 0 and result["latency"]["4"]["runs"] >= 3


def test_analyze_shares_sum_to_one(capsys, idx_model):
    code, out, _ = run(capsys, "analyze", str(idx_model / "model"), "--runs", "2", "--json")
    assert code == 0
    rows = json.loads(out)["components"]
    for key in ("params_share", "flops_share", "latency_share"):
        assert sum(r[key] for r in rows) == pytest.approx(1.0)
    assert [r["component"] for r in rows] == ["embedding", "block0.attention", "block0.mlp", "head"]


def test_train_then_eval(capsys, idx_model):
    out_dir = idx_model / "trained"
    code, out, _ = run(capsys, "train", "--model", "fmnist-vit-micro", "--data", f"idx:{idx_model / 'data'}",
                       "--out", str(out_dir), "--epochs", "1", "--batch-size", "8", "--resize",
                       "--precision", "fp32")
    assert code == 0, out
    saved = json.loads((out_dir / "config.json").read_text())
    assert saved["training"]["command"].startswith("vitrim train --model fmnist-vit-micro")
    assert len(saved["training"]["history"]) == 1
    assert vitrim.load(out_dir).config.image_size == 28


@pytest.mark.parametrize("argv, message", [
    (["eval", "no-such-model"], "unknown model 'no-such-model'"),
    (["eval", "vit-tiny"], "has no trained weights"),
    (["bench", "fmnist-vit-micro", "--batch", "0"], "positive integer"),
    (["bench", "fmnist-vit-micro", "--threads", "-2"], "positive integer"),
])
def test_bad_input_exits_2(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err


def test_wrong_image_size_and_channels(capsys, idx_model, tmp_path):
    rgb = uniform_config(1, 16, 2, 2.0, image_size=8, patch_size=4, in_chans=3, num_classes=3)
    vitrim.save(vitrim.create(rgb), tmp_path / "rgb")
    code, _, err = run(capsys, "eval", str(tmp_path / "rgb"), "--data", f"idx:{idx_model / 'data'}")
    assert code == 2 and "1-channel images but the model expects 3" in err
    code, _, err = run(capsys, "eval", "fmnist-vit-micro", "--data", f"idx:{idx_model / 'data'}")
    assert code == 2  # micro has no weights
    big = uniform_config(1, 16, 2, 2.0, image_size=16, patch_size=4, in_chans=1, num_classes=3,
                         mean=(0.5,), std=(0.5,))
    vitrim.save(vitrim.create(big), tmp_path / "big")
    code, _, err = run(capsys, "eval", str(tmp_path / "big"), "--data", f"idx:{idx_model / 'data'}")
    assert code == 2 and "8x8 images but the model expects 16x16; pass --resize" in err
    code, out, _ = run(capsys, "eval", str(tmp_path / "big"), "--data", f"idx:{idx_model / 'data'}", "--resize", "--json")
    assert code == 0 and json.loads(out)["count"] == 12


def test_truncated_data_exits_2_without_output(capsys, idx_model):
    path = idx_model / "data" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-3])
    code, out, err = run(capsys, "eval", str(idx_model / "model"), "--data", f"idx:{idx_model / 'data'}", "--json")
    assert code == 2 and out == "" and "truncated or corrupt" in err


def test_train_failure_leaves_no_model(capsys, idx_model):
    out_dir = idx_model / "never"
    code, _, err = run(capsys, "train", "--model", "fmnist-vit-micro", "--data", f"idx:{idx_model / 'data'}",
                       "--out", str(out_dir), "--lr", "-1")
    assert code == 2 and "--lr" in err and not out_dir.exists()


@pytest.mark.parametrize("spec, kind, target, stem", [
    ("hf:/data/my-vit", "hf", "/data/my-vit", "my-vit"),
    ("timm:deit_small_patch16_224", "timm", "deit_small_patch16_224", "deit_small_patch16_224"),
    ("timm:hf-hub:timm/vit_tiny", "timm", "hf-hub:timm/vit_tiny", "timm_vit_tiny"),
    ("fmnist-vit", "preset", "fmnist-vit", "fmnist-vit"),
    ("no/such/dir", "preset", "no/such/dir", "no/such/dir"),
])
def test_model_specs_parse(spec, kind, target, stem):
    from vitrim.adapters.sources import parse_spec

    parsed = parse_spec(spec)
    assert (parsed.kind, parsed.target, parsed.stem) == (kind, target, stem)


def test_existing_directories_are_directory_specs(idx_model):
    from vitrim.adapters.sources import parse_spec

    assert parse_spec(idx_model / "model").kind == "dir"
    assert parse_spec(str(idx_model / "model")).stem == "model"


@pytest.mark.parametrize("argv, message", [
    (["bench", "timm:"], "model spec 'timm:' is incomplete: use hf:DIR or timm:NAME"),
    (["analyze", "fmnist-vit", "--pretrained"], "--pretrained (pretrained=True) applies to timm:NAME models"),
    (["eval", "fmnist-vit-micro", "--pretrained"], "applies to timm:NAME models"),
    (["export", "fmnist-vit-micro", "--pretrained", "--out", "never.onnx"], "applies to timm:NAME models"),
    (["quantize", "fmnist-vit-micro", "--pretrained", "--out", "never"], "applies to timm:NAME models"),
])
def test_spec_errors_exit_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and message in err and err.count("\n") == 1


def test_prune_with_random_calibration(capsys, tmp_path):
    out = tmp_path / "pruned"
    code, stdout, err = run(capsys, "prune", "fmnist-vit-micro", "--data", "random", "--calib", "8", "--steps", "1",
                            "--round-to", "4", "--runs", "2", "--out", str(out), "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert (report["family"], report["weights"], report["calibration"]) == ("vitrim", "random", "random images")
    assert "accuracy" not in report["pruned"] and report["kept_ratio"] <= 0.5
    from vitrim.prune.report import dimension_plan

    assert dimension_plan(vitrim.load(out).config) == report["pruned"]["dimension_plan"]


def test_cli_functions_are_at_most_80_lines():
    """The command line parses, calls the library and prints: no long functions there."""
    import ast
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src" / "vitrim"
    long = []
    for path in (src / "cli.py", src / "quant" / "cli.py", src / "cli_common.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - start + 1 > 80:
                    long.append(f"{path.name}:{node.name} ({node.end_lineno - start + 1} lines)")
    assert not long, "functions over 80 lines: " + ", ".join(long)


def test_cli_defaults_are_the_librarys():
    """Each default is declared once, in the library; the parser and its help show that one."""
    import argparse

    from vitrim.cli import build_parser
    from vitrim.cli_common import default_of
    from vitrim.compress import CompressConfig
    from vitrim.prune import PruneConfig
    from vitrim.train import TrainConfig

    parser = build_parser()
    prune = parser.parse_args(["prune"])
    assert (prune.target, prune.calib, prune.steps, prune.kd_lr) == (
        PruneConfig.target, PruneConfig.calib_images, PruneConfig.steps, PruneConfig.kd_lr)
    train = parser.parse_args(["train", "--out", "x"])
    for name in ("epochs", "batch_size", "lr", "min_lr", "weight_decay", "label_smoothing", "augment", "seed",
                 "precision", "distill_alpha", "distill_temperature"):
        assert getattr(train, name) == default_of(TrainConfig, name), name
    compress = parser.parse_args(["compress"])
    assert (compress.prune, compress.quant, compress.calib) == (CompressConfig.prune, CompressConfig.quant,
                                                                 CompressConfig.calib)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert "--lr LR default: 0.001" in " ".join(sub.choices["train"].format_help().split())
    with pytest.raises(Exception, match="no field 'nope'"):
        default_of(TrainConfig, "nope")


def test_train_at_another_image_size_with_a_teacher_at_its_own(capsys, idx_model):
    """--image-size: --init's weights at 16x16 (4x the tokens), the 8x8 teacher fed its own size."""
    out_dir = idx_model / "bigger"
    model_dir = str(idx_model / "model")
    code, out, err = run(capsys, "train", "--init", model_dir, "--image-size", "16", "--teacher", model_dir,
                         "--data", f"idx:{idx_model / 'data'}", "--out", str(out_dir), "--epochs", "1",
                         "--batch-size", "8", "--precision", "fp32")
    assert code == 0, err
    trained = vitrim.load(out_dir)
    assert trained.config.image_size == 16 and trained.config.num_tokens == 17
    assert trained.pos_embed.shape[1] == 17 and trained.config.pos_embed_grid is None
