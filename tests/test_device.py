"""``--device`` and :func:`vitrim.device.resolve_device`: every command runs on ``--device cpu``; a device
this machine lacks is one error line, exit code 2, nothing written."""

import json

import pytest
import torch

import vitrim
from tests.test_cli import run
from tests.test_data import write_idx_dir
from vitrim.device import device_info, resolve_device
from vitrim.errors import ConfigError
from vitrim.models import uniform_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny saved model and an 8x8 MNIST-format dataset it fits."""
    root = tmp_path_factory.mktemp("device")
    write_idx_dir(root / "data", n_train=40, n_test=13, size=8)
    cfg = uniform_config(2, 16, 2, 2.0, image_size=8, patch_size=4, in_chans=1, num_classes=3,
                         mean=(0.5,), std=(0.5,))
    vitrim.save(vitrim.create(cfg, seed=0), root / "model")
    return root


def test_resolve_device_here():
    assert resolve_device("auto") == resolve_device(None)
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("spec, message", [
    ("cuda", "CUDA is not available on this machine"),
    ("cuda:5", "CUDA is not available on this machine"),
    ("tpu", "unknown device 'tpu'"),
    ("cpu:x", "unknown device"),
])
def test_resolve_device_errors_name_the_fix(spec, message):
    with pytest.raises(ConfigError) as info:
        resolve_device(spec)
    text = str(info.value)
    assert message in text and "\n" not in text
    assert "--device cpu" in text or "auto" in text


def test_device_info_names_cpu_and_dtype():
    info = device_info(torch.device("cpu"))
    assert info["device"] == "cpu" and info["dtype"] == "float32" and info["name"]


def _data(tiny):
    return ["--data", f"idx:{tiny / 'data'}"]


def test_eval_bench_tokens_on_cpu(capsys, tiny):
    model = str(tiny / "model")
    code, out, err = run(capsys, "eval", model, *_data(tiny), "--device", "cpu", "--json")
    assert code == 0, err
    assert json.loads(out)["count"] == 13
    code, out, err = run(capsys, "bench", model, "--batch", "2", "--runs", "2", "--threads", "1",
                         "--device", "cpu", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["device"]["device"] == "cpu" and result["device"]["dtype"] == "float32"
    code, out, err = run(capsys, "tokens", model, *_data(tiny), "--sweep", "1,0.5", "--layers", "0", "--batch", "1",
                         "--runs", "2", "--threads", "1", "--device", "cpu", "--json")
    assert code == 0, err
    assert len(json.loads(out)["rows"]) == 2


def test_train_prune_compress_quantize_on_cpu(capsys, tiny, tmp_path):
    model = str(tiny / "model")
    code, out, err = run(capsys, "train", "--init", model, *_data(tiny), "--out", str(tmp_path / "t"), "--epochs", "1",
                         "--batch-size", "8", "--precision", "fp32", "--no-eval", "--device", "cpu")
    assert code == 0, err
    assert (tmp_path / "t" / "config.json").is_file()
    code, out, err = run(capsys, "prune", model, *_data(tiny), "--calib", "16", "--steps", "1", "--round-to", "4",
                         "--runs", "2", "--threads", "1", "--out", str(tmp_path / "p"), "--device", "cpu", "--json")
    assert code == 0, err
    assert json.loads(out)["kept_ratio"] <= 0.55
    code, out, err = run(capsys, "compress", model, *_data(tiny), "--prune", "flops=0.6", "--prune-calib", "16",
                         "--tokens", "none", "--quant", "none", "--runs", "2", "--threads", "1",
                         "--out", str(tmp_path / "c"), "--device", "cpu", "--json")
    assert code == 0, err
    code, out, err = run(capsys, "quantize", model, "--scheme", "w8-dynamic", *_data(tiny), "--calib", "4",
                         "--out", str(tmp_path / "q"), "--device", "cpu", "--json")
    assert code == 0, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "tpu"])
@pytest.mark.parametrize("command", ["train", "prune", "eval", "bench", "tokens", "compress", "quantize"])
def test_missing_device_is_one_line_exit_2_nothing_written(capsys, tiny, tmp_path, command, device):
    model, out_dir = str(tiny / "model"), tmp_path / "out"
    argv = {
        "train": ["train", "--init", model, "--out", str(out_dir)],
        "prune": ["prune", model, "--out", str(out_dir)],
        "eval": ["eval", model],
        "bench": ["bench", model],
        "tokens": ["tokens", model],
        "compress": ["compress", model, "--out", str(out_dir)],
        "quantize": ["quantize", model, "--out", str(out_dir)],
    }[command]
    code, out, err = run(capsys, *argv, *([] if command == "bench" else _data(tiny)), "--device", device)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert ("CUDA is not available" if device == "cuda" else "unknown device 'tpu'") in lines[0]
    assert out == "" and list(tmp_path.iterdir()) == []
