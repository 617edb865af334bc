"""Classes of bad input to every command: one stderr line naming the problem, exit 2, no trace,
nothing written."""

import json
import os

import pytest

import vitrim
from tests.test_data import write_idx_dir
from vitrim.cli import main
from vitrim.models import uniform_config


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny 3-class model on 8x8 images, its IDX data, a plain file and a loose directory."""
    root = tmp_path_factory.mktemp("bad-input")
    write_idx_dir(root / "data", n_train=40, n_test=12, size=8)
    cfg = uniform_config(1, 16, 2, 2.0, image_size=8, patch_size=4, in_chans=1, num_classes=3,
                         mean=(0.5,), std=(0.5,))
    vitrim.save(vitrim.create(cfg, seed=0), root / "model")
    (root / "file.txt").write_text("not a directory\n")
    return root


def expand(argv, root):
    return [a.replace("{root}", str(root)) for a in argv]


def run(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, expected):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("vitrim"), err
    assert expected in lines[0], err


MODEL, DATA = "{root}/model", "idx:{root}/data"

NUMBERS = [  # options that take numbers: words, NaN, infinities, out-of-range values
    (["prune", MODEL, "--data", DATA, "--kd-lr", "nan"], "--kd-lr"),
    (["prune", MODEL, "--data", DATA, "--kd-lr", "-1"], "--kd-lr"),
    (["prune", MODEL, "--data", DATA, "--calib", "many"], "--calib"),
    (["prune", MODEL, "--data", DATA, "--seed", str(2**64)], "--seed"),
    (["prune", MODEL, "--data", DATA, "--seed", "-3"], "--seed"),
    (["train", "--out", "{root}/t", "--drop-path", "5"], "--drop-path"),
    (["train", "--out", "{root}/t", "--warmup-epochs", "inf"], "--warmup-epochs"),
    (["train", "--out", "{root}/t", "--lr", "1e999"], "--lr"),
    (["train", "--out", "{root}/t", "--label-smoothing", "1"], "--label-smoothing"),
    (["train", "--out", "{root}/t", "--distill-alpha", "1.5"], "--distill-alpha"),
    (["prune", MODEL, "--data", DATA, "--kd-alpha", "1.5"], "--kd-alpha"),
    (["prune", MODEL, "--data", DATA, "--kd-augment", "rotate"], "--kd-augment"),
    (["train", "--out", "{root}/t", "--distill-temperature", "0"], "--distill-temperature"),
    (["train", "--out", "{root}/t", "--seed", "99999999999999999999999"], "--seed"),
    (["train", "--out", "{root}/t", "--augment", "rotate"], "--augment"),
    (["train", "--out", "{root}/t", "--epochs", "0"], "--epochs"),
    (["tokens", MODEL, "--keep", "0"], "--keep"),
    (["tokens", MODEL, "--keep", "nan"], "--keep"),
    (["tokens", MODEL, "--tau", "inf"], "--tau"),
    (["export", MODEL, "--out", "{root}/m.onnx", "--tolerance", "nan"], "--tolerance"),
    (["export", MODEL, "--out", "{root}/m.onnx", "--tolerance", "-1"], "--tolerance"),
    (["quantize", MODEL, "--out", "{root}/q", "--percentile", "101"], "--percentile"),
    (["bench", MODEL, "--threads", "1000000000"], "--threads"),
    (["bench", MODEL, "--threads", "0"], "--threads"),
    (["bench", MODEL, "--batch", "-1"], "--batch"),
    (["eval", MODEL, "--data", DATA, "--batch-size", "x"], "--batch-size"),
    (["eval", MODEL, "--std", "0", "--mean", "0"], "--std"),
    (["eval", MODEL, "--data", DATA, "--workers", "-1"], "--workers"),
    (["train", "--out", "{root}/t", "--workers", "100000"], "--workers"),
    (["quantize", MODEL, "--out", "{root}/q", "--workers", "two"], "--workers"),
]

OPTIONS = [  # unknown options, choices and missing arguments
    (["prune", MODEL, "--no-such-option"], "unrecognized arguments"),
    (["prune", MODEL, "--recover", "magic"], "--recover"),
    (["train"], "--out"),
    (["no-such-command"], "invalid choice"),
    (["prune", MODEL, "--data", DATA, "--target", "flops=2"], "target ratio"),
    (["prune", MODEL, "--data", DATA, "--target", "speed=0.5"], "speed"),
    (["prune", MODEL, "--data", DATA, "--exclude", "blocks.9.*"], "blocks.9.*"),
    (["prune", MODEL, "--data", DATA, "--round-to", "4096"], "round_to"),
    (["prune", MODEL, "--data", DATA, "--structures", "wings"], "wings"),
    (["prune", MODEL, "--data", DATA, "--objective", "features", "--structures", "heads", "--recover", "kd",
      "--kd-alpha", "0.5"],
     "--kd-alpha"),
]

OUTPUTS = [  # output paths that cannot be written: found before any work
    (["prune", MODEL, "--data", DATA, "--calib", "8", "--out", "{root}/file.txt"], "not a directory"),
    (["prune", MODEL, "--data", DATA, "--calib", "8", "--out", "{root}/file.txt/sub"], "is a file"),
    (["prune", MODEL, "--data", DATA, "--calib", "8", "--out", "/proc/vitrim-out"], "not writable"),
    (["train", "--model", "fmnist-vit-micro", "--data", DATA, "--resize", "--out", "{root}/file.txt"],
     "not a directory"),
    (["train", "--model", "fmnist-vit-micro", "--data", DATA, "--resize", "--out", "/proc/vitrim-out"],
     "not writable"),
    (["train", "--model", "fmnist-vit-micro", "--data", DATA, "--resize", "--out", "{root}/fresh", "--resume"],
     "no checkpoint"),
    (["export", MODEL, "--out", "{root}"], "is a directory"),
    (["export", MODEL, "--out", "/proc/vitrim.onnx"], "not writable"),
    (["quantize", MODEL, "--out", "{root}/file.txt"], "directory"),
    (["quantize", MODEL, "--out", "/proc/vitrim-q"], "not writable"),
]

INPUTS = [  # models and data that do not exist or do not fit
    (["eval", "{root}/nowhere"], "nowhere"),
    (["eval", "{root}/file.txt"], "file.txt"),
    (["eval", MODEL, "--data", "idx:{root}/nowhere"], "nowhere"),
    (["eval", MODEL, "--data", "fashion-mnist"], "--resize"),
    (["eval", MODEL, "--data", "imagenet"], "imagenet"),
    (["train", "--model", "fmnist-vit-micro", "--data", DATA, "--resize", "--out", "{root}/t2",
      "--batch-size", "1000"], "fewer than one batch"),
    (["train", "--model", "fmnist-vit-micro", "--data", DATA, "--resize", "--out", "{root}/t3",
      "--teacher", MODEL], "classes"),
    (["eval", MODEL, "--data", "fashion-mnist", "--resize", "--limit", "16"], "class"),
    (["prune", MODEL, "--data", "fashion-mnist", "--resize", "--calib", "8"], "class"),
    (["eval", "fmnist-vit", "--data", DATA, "--resize", "--batch-size", "100000000000"], "--batch-size"),
    (["bench", MODEL, "--batch", "1", "--batch", "100000000000"], "--batch 100000000000"),
    (["analyze", MODEL, "--batch", "100000000000"], "--batch"),
    (["export", MODEL, "--out", "{root}/m.onnx", "--check-images", "100000000000"], "--check-images"),
    (["prune", MODEL, "--data", DATA, "--target", "latency=0.5", "--latency-batch", "100000000000"],
     "--latency-batch"),
]


@pytest.mark.parametrize("argv, expected", NUMBERS + OPTIONS + OUTPUTS + INPUTS,
                         ids=lambda v: " ".join(v)[:60] if isinstance(v, list) else None)
def test_bad_input_gets_one_line_and_exit_2(capsys, work, argv, expected):
    before = sorted(p.name for p in work.iterdir())
    code, _, err = run(capsys, expand(argv, work))
    assert_one_line_error(code, err, expected.replace("{root}", str(work)))
    assert sorted(p.name for p in work.iterdir()) == before  # nothing written, no stray parts


def test_unexpected_failure_is_one_line_with_verbose_hint(capsys, work, monkeypatch):
    import vitrim.cli as cli

    def broken(args):
        raise RuntimeError("something deep inside\nwith a second line")

    monkeypatch.setattr(cli, "cmd_models", broken)
    code, _, err = run(capsys, ["models"])
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "RuntimeError: something deep inside" in err and "--verbose" in err
    code, _, err = run(capsys, ["models", "--verbose"])
    assert code == 1 and "Traceback" in err


def test_disk_errors_are_one_line(capsys, work, monkeypatch):
    import vitrim.cli as cli

    def full(args):
        raise OSError(28, "No space left on device", str(work / "x"))

    monkeypatch.setattr(cli, "cmd_models", full)
    code, _, err = run(capsys, ["models"])
    assert_one_line_error(code, err, "No space left on device")


def test_resume_with_other_settings_is_refused(capsys, work):
    out = work / "resumed"
    base = ["train", "--model", "fmnist-vit-micro", "--data", DATA.replace("{root}", str(work)), "--resize",
            "--out", str(out), "--epochs", "1", "--batch-size", "8", "--no-eval", "--precision", "fp32"]
    code, _, err = run(capsys, base)
    assert code == 0, err
    saved = json.loads((out / "config.json").read_text())
    assert saved["training"]["config"]["augment"] == "crop"
    for extra, name in ((["--lr", "0.01"], "lr"), (["--batch-size", "4"], "batch_size"), (["--seed", "3"], "seed"),
                        (["--augment", "crop,flip"], "augment")):
        code, _, err = run(capsys, base + ["--resume"] + extra)
        assert_one_line_error(code, err, name)
        assert "pass the same options" in err
    code, _, err = run(capsys, base + ["--resume"])
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["training"]["config"] == saved["training"]["config"]


def test_output_lock_refuses_a_second_writer(work):
    from vitrim.errors import OutputError
    from vitrim.fsutil import output_lock

    with output_lock(work / "locked"):
        with pytest.raises(OutputError, match=f"being written by another vitrim run \\(pid {os.getpid()}\\)"):
            with output_lock(work / "locked"):
                pass
    with output_lock(work / "locked"):  # released
        pass
