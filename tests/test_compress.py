import json

import pytest
import torch

import vitrim
from tests.test_cli import run
from tests.test_data import write_idx_dir
from vitrim.compress import CompressConfig, parse_tokens
from vitrim.errors import ConfigError
from vitrim.models import uniform_config


def test_token_specs():
    assert parse_tokens("keep=0.6") == ("keep", 0.6)
    assert parse_tokens(None) is None
    with pytest.raises(ConfigError, match="per-image token model.*cannot be exported"):
        parse_tokens("tau=0.9")
    with pytest.raises(ConfigError, match="must look like keep=0.7"):
        parse_tokens("ratio=0.5")


@pytest.mark.parametrize("kwargs, message", [
    (dict(prune="flops=3"), r"\(0, 1\]"), (dict(quant="int3"), "unknown quantization scheme"),
    (dict(calib_method="mse"), "unknown calibrator"), (dict(tokens="tau=0.5"), "cannot be exported"),
    (dict(token_method="merge"), "unknown token method 'merge'; use one of drop, evit, tome"),
])
def test_bad_pipeline_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CompressConfig(**kwargs)


def test_cli_compress_runs_every_stage(capsys, tmp_path):
    torch.set_num_threads(1)
    write_idx_dir(tmp_path / "data", n_train=160, n_test=16, size=16)
    cfg = uniform_config(2, 32, 2, 2.0, image_size=16, patch_size=2, in_chans=1, num_classes=3,
                         mean=(0.5,), std=(0.25,))
    model = vitrim.create(cfg, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    vitrim.save(model, tmp_path / "m")
    out = tmp_path / "c"
    code, stdout, err = run(capsys, "compress", str(tmp_path / "m"), "--data", f"idx:{tmp_path / 'data'}",
                            "--prune", "flops=0.6", "--prune-calib", "64", "--tokens", "keep=0.5", "--layers", "0", "--quant", "w8-dynamic",
                            "--calib", "16", "--runs", "2", "--threads", "1", "--out", str(out), "--json")
    assert code == 0, err
    report = json.loads(stdout)
    names = [s["stage"] for s in report["stages"]]
    assert names[0] == "torch fp32 dense" and names[-1] == "ORT w8-dynamic" and len(names) == 5
    flops = [s["flops"] for s in report["stages"]]
    assert flops[1] < flops[0] and flops[2] < flops[1] and flops[3] == flops[2]
    assert report["stages"][3]["check"]["passed"]
    assert report["stages"][-1]["size_bytes"] < report["stages"][3]["size_bytes"]
    for name in ("report.json", "report.md", "report.png", "model-fp32.onnx", "model-w8-dynamic.onnx"):
        assert (out / name).is_file()
    assert vitrim.load(out / "pruned").config.embed_dim <= 32
    for stage in report["stages"]:  # every ratio is the ratio of the report's own milliseconds
        for batch in (1, 64):
            dense = report["stages"][0][f"latency_ms_b{batch}"]
            assert stage[f"speedup_b{batch}"] == pytest.approx(dense / stage[f"latency_ms_b{batch}"], rel=1e-9)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".c.")]  # no temporary parts left


def test_compress_refuses_bad_token_settings_before_any_work(capsys, tmp_path):
    write_idx_dir(tmp_path / "data", n_train=40, n_test=8, size=8)
    cfg = uniform_config(2, 16, 2, 2.0, image_size=8, patch_size=4, in_chans=1, num_classes=3,
                         mean=(0.5,), std=(0.5,))
    vitrim.save(vitrim.create(cfg, seed=0), tmp_path / "m")
    for extra, message in ((["--tokens", "keep=1.5"], "keep ratio"), (["--layers", "7"], "token layer 7"),
                           (["--calib", "1000"], "calib")):
        code, _, err = run(capsys, "compress", str(tmp_path / "m"), "--data", f"idx:{tmp_path / 'data'}",
                           "--out", str(tmp_path / "c"), *extra)
        assert code == 2 and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "c").exists()
