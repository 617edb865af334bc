"""A run killed at any point leaves the previous output or the new one, never a mix; concurrent
runs to one output end with one complete result and the other run told so."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import vitrim
from tests.test_data import write_idx_dir
from vitrim.io import load_state
from vitrim.models import uniform_config


def vitrim_process(*argv, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VITRIM_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "vitrim", *map(str, argv)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process, timeout=300):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    write_idx_dir(root / "data", n_train=64, n_test=16, size=8)
    cfg = uniform_config(2, 32, 2, 2.0, image_size=8, patch_size=2, in_chans=1, num_classes=3,
                         mean=(0.5,), std=(0.5,))
    vitrim.save(vitrim.create(cfg, seed=0), root / "model")
    return root


def prune_args(root, out, ratio):
    return ["prune", root / "model", "--data", f"idx:{root / 'data'}", "--target", f"params={ratio}",
            "--calib", "16", "--runs", "1", "--threads", "1", "--out", out]


def check_whole_prune_output(out, ratios):
    """``out`` is a complete result of one of the runs: config, weights and report agree."""
    model = vitrim.load(out)  # weights match config, or this raises
    saved = json.loads((out / "config.json").read_text())["pruning"]["config"]["target"]
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["config"]["target"] == saved and saved in {f"params={r}" for r in ratios}
    assert report["pruned"]["embed_dim"] == model.config.embed_dim


def parts(out):
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.") and p.name.endswith(".part")]


def test_killed_prune_leaves_previous_or_new_output(work):
    out = work / "pruned"
    code, _, err = finish(vitrim_process(*prune_args(work, out, 0.7), cwd=work))
    assert code == 0, err
    started = time.perf_counter()
    code, _, err = finish(vitrim_process(*prune_args(work, out, 0.5), cwd=work))
    assert code == 0, err
    duration = time.perf_counter() - started
    rng = random.Random(0)
    for i in range(5):
        process = vitrim_process(*prune_args(work, out, 0.6 if i % 2 else 0.4), cwd=work)
        time.sleep(rng.uniform(0.2, duration * 1.1))
        process.send_signal(signal.SIGKILL)
        process.communicate()
        check_whole_prune_output(out, (0.7, 0.5, 0.6, 0.4))
    code, _, err = finish(vitrim_process(*prune_args(work, out, 0.7), cwd=work))
    assert code == 0, err
    check_whole_prune_output(out, (0.7,))
    assert not parts(out)  # what a killed run left beside the output is cleaned by the next run


def train_args(root, out, *extra):
    return ["train", "--model", "fmnist-vit-micro", "--data", f"idx:{root / 'data'}", "--resize", "--out", out,
            "--epochs", "3", "--batch-size", "16", "--no-eval", "--precision", "fp32", "--threads", "1", *extra]


def test_killed_training_resumes_to_the_uninterrupted_weights(work):
    reference = work / "train-ref"
    started = time.perf_counter()
    code, _, err = finish(vitrim_process(*train_args(work, reference), cwd=work))
    assert code == 0, err
    duration = time.perf_counter() - started
    expected = load_state(reference / "model.safetensors")
    out = work / "train-killed"
    rng = random.Random(1)
    for _ in range(3):
        process = vitrim_process(*train_args(work, out, *(["--resume"] if (out / "checkpoint").is_dir() else [])),
                                 cwd=work)
        time.sleep(rng.uniform(0.5, duration))
        process.send_signal(signal.SIGKILL)
        process.communicate()
    resume = ["--resume"] if (out / "checkpoint").is_dir() else []
    code, _, err = finish(vitrim_process(*train_args(work, out, *resume), cwd=work))
    assert code == 0, err
    got = load_state(out / "model.safetensors")
    assert all(torch.equal(got[k], expected[k]) for k in expected)


WAIT_THEN_RUN = """
import sys, time
from pathlib import Path
from vitrim.cli import main  # imported before the wait: the run starts at once when the lock is seen
lock, pid = Path(sys.argv[1]), sys.argv[2]
while not (lock.exists() and lock.read_text().strip() == pid):
    time.sleep(0.01)
sys.exit(main(sys.argv[3:]))
"""


def test_concurrent_runs_to_one_output(work):
    out = work / "contested"
    lock = work / f".{out.name}.lock"
    first = vitrim_process(*train_args(work, out), cwd=work)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VITRIM_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    second = subprocess.Popen([sys.executable, "-c", WAIT_THEN_RUN, str(lock), str(first.pid),
                               *map(str, train_args(work, out))], cwd=work, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    code, _, err = finish(second, timeout=120)
    assert code == 2 and "being written by another vitrim run" in err and err.count("\n") == 1, err
    code, _, err = finish(first)
    assert code == 0, err
    vitrim.load(out)
    assert not lock.exists()
