"""World size 1 vs 2 (two gloo processes on 127.0.0.1): the same saliency, plan and reconstructed weights,
the same DDP training as one process with the global batch, a world-2 checkpoint resumed in one process,
and sharded evaluation equal to one process's on a count not divisible by 2 (classification, detection
and segmentation)."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import vitrim
from vitrim import distributed
from vitrim.data.dataset import ImageSet
from vitrim.models import uniform_config
from vitrim.train import TrainConfig, fit

WORLD = 2
CALIB = 21  # odd: the shards differ in size
TEST = 13  # odd: no image dropped or repeated at the tail


def tiny_model():
    cfg = uniform_config(2, 16, 2, 2.0, image_size=8, patch_size=4, in_chans=1, num_classes=3,
                         mean=(0.5,), std=(0.5,))
    model = vitrim.create(cfg, seed=0)
    with torch.no_grad():  # a zero-initialised head would give every gate a zero gradient
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def images(count, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (count, 1, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 3, (count,), generator=g)
    return ImageSet(x, y, ["a", "b", "c"], (0.5,), (0.5,), "random")


def train_config(batch, epochs=1):
    return TrainConfig(epochs=epochs, batch_size=batch, lr=1e-3, warmup_epochs=0.0, precision="fp32", seed=3,
                       augment="crop,flip")


def saliency_scores(model, data):
    from vitrim.prune.api import calibration_batches
    from vitrim.prune.saliency import saliency

    batches = calibration_batches(data, CALIB, 8, 8, seed=0)
    return saliency(model, batches, "fisher")


class Interrupted(Exception):
    pass


def _stop_after_first(model, record):
    raise Interrupted


def dense_scores(root):
    """Every dense task's val metrics of a small random dense model, or None without pycocotools."""
    try:
        import pycocotools  # noqa: F401
    except ImportError:
        return None
    from tests.test_dense_prune import dense_model
    from vitrim.data.coco import load_coco
    from vitrim.dense.train import evaluate_dense

    val = load_coco(root, "val", image_size=32)
    scores, seen = {}, []
    for task in ("detect", "segment"):
        model = dense_model(task)
        model.backbone.patch_embed.register_forward_hook(lambda module, args, out: seen.append(out.shape[0]))
        scores[task] = evaluate_dense(model, val, batch_size=2)
    return {"scores": scores, "images_seen": sum(seen)}


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    try:
        result = {"rank": distributed.rank(), "world": distributed.world_size()}
        data, test = images(40, 1), images(TEST, 2)
        result["scores"] = saliency_scores(tiny_model(), data)
        pruned = vitrim.prune(tiny_model(), "flops=0.5", data, steps=1, round_to=4, calib_images=CALIB,
                              batch_size=8, progress=False)
        result["plan"] = pruned.model.config.to_dict()
        result["pruned"] = pruned.model.state_dict()
        result["eval"] = vitrim.evaluate(tiny_model(), test, batch_size=4)
        result["dense"] = dense_scores(os.path.join(out, "coco"))
        model = tiny_model()
        fit(model, data, train_config(4), os.path.join(out, "train"), progress=False)
        result["trained"] = model.state_dict()
        try:
            fit(tiny_model(), data, train_config(4, epochs=2), os.path.join(out, "resume"), progress=False,
                on_epoch_end=_stop_after_first)
        except Interrupted:
            pass
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    try:
        from tests.conftest import coco_items
        from vitrim.data.coco import write_synthetic_coco

        write_synthetic_coco(out / "coco", coco_items(12, 3), train=2, val=TEST, canvas=32, seed=3)
    except ImportError:  # no pycocotools: the dense scores are not compared
        pass
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return out, [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def test_ranks_are_set(two_ranks):
    _, results = two_ranks
    assert [(r["rank"], r["world"]) for r in results] == [(0, 2), (1, 2)]
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()


def test_shard_is_exact():
    parts = [distributed.shard(list(range(7)), r, 3) for r in range(3)]
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]
    assert distributed.all_reduce_sum(torch.ones(2)).tolist() == [1.0, 1.0]  # one process: unchanged


def test_saliency_is_the_single_process_one(two_ranks):
    _, results = two_ranks
    single = saliency_scores(tiny_model(), images(40, 1))
    assert all(float(v.abs().sum()) > 0 for v in single.values())  # a signal to agree on
    for result in results:
        assert set(result["scores"]) == set(single)
        for key, value in single.items():
            torch.testing.assert_close(result["scores"][key], value, rtol=1e-6, atol=1e-12)


def test_plan_and_reconstruction_match(two_ranks):
    _, results = two_ranks
    single = vitrim.prune(tiny_model(), "flops=0.5", images(40, 1), steps=1, round_to=4, calib_images=CALIB,
                          batch_size=8, progress=False)
    for result in results:
        assert result["plan"] == single.model.config.to_dict()
        for key, value in single.model.state_dict().items():
            torch.testing.assert_close(result["pruned"][key], value, rtol=1e-5, atol=1e-5)


def test_sharded_evaluation_is_exact(two_ranks):
    _, results = two_ranks
    single = vitrim.evaluate(tiny_model(), images(TEST, 2), batch_size=4)
    for result in results:
        assert result["eval"]["count"] == TEST
        assert result["eval"]["accuracy"] == single["accuracy"]
        assert result["eval"]["loss"] == pytest.approx(single["loss"], rel=1e-6)


def test_sharded_dense_evaluation_is_exact(two_ranks):
    """Detection mAP (the shards' detections gathered) and segmentation mIoU (the confusion matrices
    summed) under two ranks equal one process's, on a val count not divisible by 2."""
    pytest.importorskip("pycocotools")
    out, results = two_ranks
    single = dense_scores(out / "coco")
    assert single["images_seen"] == 2 * TEST
    scores = single["scores"]
    assert scores["detect"].keys() >= {"map", "ap50"} and scores["segment"]["pixel_accuracy"] > 0
    assert [r["dense"]["images_seen"] for r in results] == [2 * 7, 2 * 6]  # each rank its shard, per task
    for result in results:
        for task, metrics in scores.items():
            assert result["dense"]["scores"][task] == pytest.approx(metrics, rel=1e-6, abs=1e-9)


def test_ddp_training_matches_the_global_batch(two_ranks, tmp_path):
    _, results = two_ranks
    model = tiny_model()
    fit(model, images(40, 1), train_config(4 * WORLD), tmp_path / "single", progress=False)
    for result in results:
        for key, value in model.state_dict().items():
            got = result["trained"][key]
            if key.endswith("attn.qkv.bias"):  # the key bias has no true gradient (softmax is shift-invariant):
                width = value.shape[0] // 3  # AdamW turns its float noise into lr-sized steps, so skip it
                got, value = torch.cat([got[:width], got[2 * width:]]), torch.cat([value[:width], value[2 * width:]])
            torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6)


def test_world_2_checkpoint_resumes_in_one_process(two_ranks, capsys):
    import json

    out, _ = two_ranks
    state = json.loads((out / "resume" / "checkpoint" / "trainer.json").read_text())
    assert (state["epoch"], state["world_size"], state["global_batch"]) == (1, 2, 8)
    assert state["global_step"] == 40 // 8
    model = tiny_model()
    result = fit(model, images(40, 1), train_config(4, epochs=2), out / "resume", resume=True)
    assert [h["epoch"] for h in result.history] == [1, 2]
    log = capsys.readouterr().out
    assert "global batch 4 (4 per process x 1 process(es))" in log and "from step 10" in log


@pytest.mark.parametrize("command", ["eval", "tokens"])
def test_torchrun_eval_equals_one_process(tmp_path, command):
    """``torchrun --nproc_per_node 2 -m vitrim eval|tokens`` prints the single-process accuracy (rank 0 only)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from tests.test_data import write_idx_dir

    write_idx_dir(tmp_path / "data", n_train=8, n_test=TEST, size=8)
    vitrim.save(tiny_model(), tmp_path / "model")
    argv = [command, str(tmp_path / "model"), "--data", f"idx:{tmp_path / 'data'}", "--device", "cpu", "--json"]
    argv += ["--batch-size", "4"] if command == "eval" else ["--sweep", "1,0.5", "--batch", "1", "--runs", "3"]
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([str(torchrun), "--nproc_per_node", str(WORLD), "--master_addr", "127.0.0.1",
                           "--master_port", str(free_port()), "-m", "vitrim", *argv],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    single = subprocess.run([sys.executable, "-m", "vitrim", *argv], capture_output=True, text=True, env=env,
                            timeout=120)
    ours, theirs = json.loads(done.stdout), json.loads(single.stdout)  # printed once, by rank 0
    if command == "tokens":
        assert [r["accuracy"] for r in ours["rows"]] == [r["accuracy"] for r in theirs["rows"]]
        assert all(r["latency"]["1"]["median_ms"] > 0 for r in ours["rows"])  # rank 0 timed them
        return
    assert ours["count"] == theirs["count"] == TEST and ours["accuracy"] == theirs["accuracy"]
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6)  # float32 batch sums, grouped otherwise


@pytest.mark.parametrize("argv", [["eval", "no-such-model"], ["models"]])
def test_the_cli_leaves_the_process_group_it_joined(argv, capsys):
    """Whether the command succeeds or fails, ``vitrim`` destroys its process group before it returns:
    left to interpreter exit, gloo's threads abort a finished rank now and then."""
    import torch.distributed as dist

    from vitrim.cli import main

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        code = main(argv)
    finally:
        joined = dist.is_initialized()
        if joined:
            dist.destroy_process_group()
    assert (code == 0) == (argv == ["models"]) and not joined
