"""`vitrim export` / `vitrim quantize` and the eval/bench hooks for .onnx files."""

import argparse
import json

import pytest
import torch

import onnxruntime  # noqa: F401  (the vitrim[onnx] extra, installed by make test)

import onnx  # noqa: E402

import vitrim  # noqa: E402
import vitrim.cli  # noqa: E402
from tests.test_data import write_idx_dir  # noqa: E402
from vitrim.data import load_dataset  # noqa: E402
from vitrim.errors import ConfigError  # noqa: E402
from vitrim.models import uniform_config  # noqa: E402
from vitrim.quant import MissingMetadataError, OnnxModel  # noqa: E402
from vitrim.bench.any_model import measure_any  # noqa: E402
from vitrim.cli_common import add_onnx_input_args, resolve_runnable  # noqa: E402
from vitrim.quant.cli import register  # noqa: E402

_build_parser = vitrim.cli.build_parser


def _parser_with_quant():
    """vitrim's parser with export/quantize registered as cli.py will (no-op once it does)."""
    parser = _build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "export" not in sub.choices:
        register(sub)
    return parser


@pytest.fixture(autouse=True)
def wired(monkeypatch):
    monkeypatch.setattr(vitrim.cli, "build_parser", _parser_with_quant)
    torch.set_num_threads(1)


def run(capsys, *argv):
    code = vitrim.cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A trained-shape model directory, an 8x8 IDX dataset it fits, and its CLI export."""
    root = tmp_path_factory.mktemp("cli")
    write_idx_dir(root / "data", n_train=40, n_test=12, size=8)
    cfg = uniform_config(1, 32, 2, 2.0, image_size=8, patch_size=4, in_chans=1, num_classes=3,
                         mean=(0.5,), std=(0.5,))
    torch.manual_seed(0)
    model = vitrim.create(cfg, seed=0)
    with torch.no_grad():
        model.head.weight.normal_(0, 0.5)
    vitrim.save(model, root / "model")
    old = vitrim.cli.build_parser
    vitrim.cli.build_parser = _parser_with_quant
    try:
        code = vitrim.cli.main(["export", str(root / "model"), "--out", str(root / "model.onnx"),
                                "--data", f"idx:{root / 'data'}", "--check-images", "6", "--threads", "1",
                                "--json"])
    finally:
        vitrim.cli.build_parser = old
    assert code == 0
    return root


def test_export_writes_a_checked_onnx_with_metadata(setup, capsys):
    root = setup
    code, out, _ = run(capsys, "export", str(root / "model"), "--out", str(root / "again.onnx"),
                       "--data", f"idx:{root / 'data'}", "--check-images", "6", "--threads", "1", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["exporter"] == "dynamo" and result["opset"] == 23 and result["weights"] == "trained"
    assert result["check"]["images"] == 6 and result["check"]["passed"]
    assert result["check"]["max_abs_diff"] < 1e-4
    assert OnnxModel(root / "again.onnx").config == vitrim.load(root / "model").config


@pytest.mark.parametrize("scheme", ["w8a8", "w8-dynamic", "w4"])
def test_quantize_writes_model_and_report(setup, capsys, tmp_path, scheme):
    root = setup
    out_dir = tmp_path / scheme
    code, out, err = run(capsys, "quantize", str(root / "model.onnx"), "--scheme", scheme, "--calib", "16",
                         "--data", f"idx:{root / 'data'}", "--block-size", "16", "--out", str(out_dir),
                         "--threads", "1")
    assert code == 0, err
    assert f"with {scheme}" in out and "smaller" in out and "check: max |logit diff|" in out
    report = json.loads((out_dir / "quantize.json").read_text())
    assert report["scheme"] == scheme and report["check"]["images"] == 16
    assert report["command"].startswith("vitrim quantize ")
    assert OnnxModel(out_dir / "model.onnx").quantization["scheme"] == scheme
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.onnx", "quantize.json"]


def test_quantize_from_model_directory_with_calibrator(setup, capsys, tmp_path):
    root = setup
    code, out, err = run(capsys, "quantize", str(root / "model"), "--scheme", "w8a8", "--calib", "20",
                         "--calib-method", "percentile", "--data", f"idx:{root / 'data'}",
                         "--out", str(tmp_path / "q"), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["calibrator"] == "percentile" and result["calib_images"] == 20


def test_calibration_set_smaller_than_asked(setup, capsys, tmp_path):
    root = setup
    code, _, err = run(capsys, "quantize", str(root / "model.onnx"), "--calib", "100",
                       "--data", f"idx:{root / 'data'}", "--out", str(tmp_path / "q"))
    assert code == 2
    assert err.strip() == (f"vitrim quantize: error: idx:{root / 'data'}/train has 40 images, asked for 100; "
                           f"lower the count or use a larger split")
    assert not (tmp_path / "q").exists()


def test_corrupt_onnx_given_to_quantize(setup, capsys, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01garbage" * 10)
    code, _, err = run(capsys, "quantize", str(bad), "--scheme", "w4", "--out", str(tmp_path / "q"))
    assert code == 2 and "bad.onnx is not a valid ONNX model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "q").exists()


def test_unknown_scheme_or_calibrator_is_a_usage_error(setup, capsys, tmp_path):
    for extra in (["--scheme", "int3"], ["--calib-method", "kl"]):
        with pytest.raises(SystemExit) as exc:
            vitrim.cli.main(["quantize", str(setup / "model.onnx"), "--out", str(tmp_path / "q"), *extra])
        assert exc.value.code == 2
        assert "invalid choice" in capsys.readouterr().err


def resolve_model_or_onnx(args):
    """The model eval/bench run for ``args.model``: a .onnx file in ONNX Runtime, else the torch model."""
    return resolve_runnable(args)


def _eval_bench_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=None)
    add_onnx_input_args(parser)
    return parser


def test_eval_and_bench_hooks_accept_onnx(setup):
    root = setup
    args = _eval_bench_parser().parse_args([str(root / "model.onnx"), "--threads", "1"])
    model, kind = resolve_model_or_onnx(args)
    assert kind == "onnx" and isinstance(model, OnnxModel) and model.threads == 1
    data = load_dataset(f"idx:{root / 'data'}", "test")
    torch_model, _ = resolve_model_or_onnx(_eval_bench_parser().parse_args([str(root / "model")]))
    assert vitrim.evaluate(model, data)["accuracy"] == vitrim.evaluate(torch_model, data)["accuracy"]
    onnx_bench = measure_any(model, [1, 4], threads=1, runs=2)
    torch_bench = measure_any(torch_model, [1, 4], threads=1, runs=2)
    assert onnx_bench.keys() >= torch_bench.keys() and set(onnx_bench["latency"]) == {"1", "4"}
    assert onnx_bench["params"] == torch_bench["params"] and onnx_bench["flops"] == torch_bench["flops"]


def test_eval_hook_needs_flags_for_foreign_onnx(setup, tmp_path):
    proto = onnx.load(str(setup / "model.onnx"))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    parser = _eval_bench_parser()
    with pytest.raises(MissingMetadataError, match="--image-size, --in-chans, --mean and --std"):
        resolve_model_or_onnx(parser.parse_args([str(tmp_path / "bare.onnx")]))
    with pytest.raises(ConfigError, match="also pass --mean, --std"):
        resolve_model_or_onnx(parser.parse_args([str(tmp_path / "bare.onnx"), "--image-size", "8", "--in-chans", "1"]))
    model, _ = resolve_model_or_onnx(parser.parse_args([str(tmp_path / "bare.onnx"), "--image-size", "8",
                                                        "--in-chans", "1", "--mean", "0.5", "--std", "0.5"]))
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 3)


def test_blockwise_from_model_directory(setup, capsys, tmp_path):
    root = setup
    code, out, err = run(capsys, "quantize", str(root / "model"), "--calib-method", "blockwise", "--calib", "16",
                         "--round-steps", "5", "--search-images", "8", "--data", f"idx:{root / 'data'}",
                         "--out", str(tmp_path / "q"), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["calibrator"] == "blockwise" and result["calibration"]["images"] == 16
    assert [s["name"] for s in result["calibration"]["stages"]] == ["embed", "block 0", "head"]
    assert OnnxModel(tmp_path / "q" / "model.onnx").quantization["blockwise"]["layers"] == "6 of 6"


@pytest.mark.parametrize("extra", [["--calib-method", "blockwise"], ["--scheme", "int-only"]])
def test_torch_side_methods_refuse_an_onnx_file(setup, capsys, tmp_path, extra):
    code, _, err = run(capsys, "quantize", str(setup / "model.onnx"), *extra, "--out", str(tmp_path / "q"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "runs the model in PyTorch; give the model directory or preset, not the .onnx file" in err
    assert not (tmp_path / "q").exists()


def test_eval_cli_on_foreign_or_corrupt_onnx(setup, capsys, tmp_path):
    proto = onnx.load(str(setup / "model.onnx"))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    (tmp_path / "bad.onnx").write_bytes(b"not an onnx model")
    data = f"idx:{setup / 'data'}"
    code, _, err = run(capsys, "eval", str(tmp_path / "bare.onnx"), "--data", data)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "has no vitrim preprocessing metadata" in err and "--image-size, --in-chans, --mean and --std" in err
    code, out, err = run(capsys, "eval", str(tmp_path / "bare.onnx"), "--data", data, "--image-size", "8",
                         "--in-chans", "1", "--mean", "0.5", "--std", "0.5", "--json")
    assert code == 0, err
    assert json.loads(out)["count"] == 12
    code, _, err = run(capsys, "eval", str(tmp_path / "bad.onnx"), "--data", data)
    assert code == 2 and "bad.onnx is not a valid ONNX model" in err and len(err.strip().splitlines()) == 1
