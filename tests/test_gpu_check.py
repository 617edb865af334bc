"""benchmarks/gpu_check.py: its CPU dry run writes a complete result, and without CUDA it says so
in one line and exits 0 (a check for users, not a failure)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def run(*args: str, timeout: int = 120, launcher: tuple[str, ...] = (sys.executable,),
        threads: int = 2) -> subprocess.CompletedProcess:
    """Run the script in its own process group, killed whole (torchrun's workers too) on a timeout."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", VITRIM_OFFLINE="1")
    proc = subprocess.Popen([*launcher, str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_cpu_dry_run_writes_the_result(tmp_path):
    done = run("--cpu-dry-run", "--out-dir", str(tmp_path), "--kd-steps", "10", "--runs", "3")
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "gpu_check.json").exists()  # a dry run is never filed as a GPU result
    data = json.loads((tmp_path / "gpu_check_cpu_dry_run.json").read_text())
    assert data["dry_run"] is True and data["shape"] == "tiny"
    hw, r = data["hardware"], data["results"]
    assert hw["world_size"] == 1 and hw["dtype"] == "float32" and hw["ranks"][0]["device"] == "cpu"
    assert abs(r["kept_flops"] - 0.5) < 0.02 and r["params_pruned"] < r["params_dense"]
    assert r["kd_steps"] == 10 and r["kd_global_batch"] == 16
    for key in ("agreement_before_kd", "agreement_after_kd"):
        assert 0 <= r[key] <= 1
    for batch in data["settings"]["batch"]:
        assert r[f"dense_ms_b{batch}"] > 0 and r[f"pruned_ms_b{batch}"] > 0 and r[f"speedup_b{batch}"] > 0
    markdown = (tmp_path / "gpu_check_cpu_dry_run.md").read_text()
    assert "not a GPU result" in markdown and "| 16 |" in markdown


def test_cpu_dry_run_under_torchrun_two_ranks(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this Python")
    done = run("--cpu-dry-run", "--out-dir", str(tmp_path), "--kd-steps", "4", "--runs", "2", "--eval-images", "32",
               "--batch", "4", launcher=(str(torchrun), "--standalone", "--nproc_per_node", "2"), threads=1)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads((tmp_path / "gpu_check_cpu_dry_run.json").read_text())
    assert data["hardware"]["world_size"] == 2 and len(data["hardware"]["ranks"]) == 2
    assert data["results"]["kd_global_batch"] == 32 and abs(data["results"]["kept_flops"] - 0.5) < 0.02


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    done = run("--out-dir", str(tmp_path), timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--cpu-dry-run" in lines[0]
    assert not any(tmp_path.iterdir())
