"""Every command the README shows (and `make demo`'s) runs, in the README's order, with small
limits appended so the whole walk-through stays quick; the Python example runs too.

Commands naming ``timm:`` models run in the timm environment (`make test-timm` selects them).
"""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from vitrim.cli import main

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")

# Appended to each command (argparse keeps the last value): fewer images, runs and epochs.
LIMITS = {
    "eval": ["--limit", "256"],
    "bench": ["--runs", "3"],
    "analyze": ["--runs", "3"],
    "train": ["--limit", "256", "--epochs", "1", "--no-eval"],
    "prune": ["--calib", "32", "--steps", "1", "--limit", "256", "--runs", "3", "--kd-images", "128"],
    "tokens": ["--limit", "256", "--runs", "3"],
    "export": [],
    "quantize": ["--calib", "16", "--search-images", "8", "--round-steps", "1"],
    "compress": ["--prune-calib", "32", "--calib", "16", "--limit", "256", "--runs", "3", "--joint-calib", "32",
                 "--joint-eval", "64", "--prune-ratios", "1,0.5", "--keeps", "1,0.7", "--precisions", "fp32",
                 "--joint-verify", "2", "--joint-seconds", "0.5"],
    "models": [],
    "coco-synthetic": ["--train", "48", "--val", "16", "--canvas", "32"],
}


def readme_commands() -> list[str]:
    """``vitrim ...`` lines of the README's bash blocks, then of the Makefile's demo recipe."""
    text = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("vitrim "):
                lines.append(line)
    demo = re.search(r"^demo:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), flags=re.M)
    for line in demo.group(1).splitlines():
        line = line.strip().replace("$(VITRIM)", "vitrim")
        if line.startswith("vitrim "):
            lines.append(line)
    return lines


COMMANDS = readme_commands()
HAS_TIMM = importlib.util.find_spec("timm") is not None


def test_the_readme_shows_commands_of_every_kind():
    kinds = {shlex.split(c)[1] for c in COMMANDS}
    assert set(LIMITS) <= kinds | {"models"}, f"LIMITS names commands the README no longer shows: {set(LIMITS) - kinds}"
    assert kinds <= set(LIMITS), f"add limits for the README's new commands: {kinds - set(LIMITS)}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs(command, workdir, monkeypatch, capsys):
    needs_timm = "timm:" in command
    if needs_timm != HAS_TIMM:
        pytest.skip("timm commands run in the timm environment, the others in the core one")
    if not needs_timm and not FASHION.is_dir():
        pytest.fail(f"{FASHION} is missing: run `make data` (Debian's dataset-fashion-mnist)")
    argv = shlex.split(command)[1:]
    monkeypatch.chdir(workdir)  # relative outputs (runs/...) land in a fresh directory
    monkeypatch.setenv("VITRIM_CACHE", str(workdir / "cache"))
    try:
        code = main(argv + LIMITS[argv[0]])
    except SystemExit as exc:
        code = exc.code
    _, err = capsys.readouterr()
    assert code == 0, f"{command}\n{err}"


def test_readme_python_example_runs(workdir, monkeypatch):
    if HAS_TIMM:
        pytest.skip("runs in the core environment")
    text = (ROOT / "README.md").read_text()
    code = re.search(r"## The Python API\n\n```python\n(.*?)```", text, flags=re.S).group(1)
    small = {'load_dataset("fashion-mnist", "test")': 'load_dataset("fashion-mnist", "test").subset(256)',
             'load_dataset("fashion-mnist", "train")': 'load_dataset("fashion-mnist", "train").subset(512)',
             "threads=2))": "threads=2, runs=3))",
             "vitrim.analyze(model)": "vitrim.analyze(model, runs=3)",
             'recover="reconstruct")': 'recover="reconstruct", calib_images=64, steps=1)',
             "calib=train.subset(128))": "calib=train.subset(16))"}
    for old, new in small.items():
        assert old in code, f"the README's example no longer loads {old}"
        code = code.replace(old, new)
    monkeypatch.chdir(workdir)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert (workdir / "runs" / "small" / "config.json").is_file()
