"""OnnxModel: ORT behind vitrim's call shape — evaluate, latency, threads, metadata, bad files."""

import pytest
import torch

import onnxruntime  # noqa: F401  (the vitrim[onnx] extra, installed by make test)

import onnx  # noqa: E402

import vitrim  # noqa: E402
from tests.conftest import uneven_config  # noqa: E402
from vitrim.bench.latency import measure_latency  # noqa: E402
from vitrim.data import ImageSet  # noqa: E402
from vitrim.errors import ConfigError, DataError  # noqa: E402
from vitrim.models import VisionTransformer  # noqa: E402
from vitrim.quant import (MissingMetadataError, OnnxFileError, OnnxModel, Preprocessing, export,  # noqa: E402
                          measure_onnx)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The uneven model, exported with the (fast) TorchScript exporter: the runner is under test here."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = VisionTransformer(uneven_config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    root = tmp_path_factory.mktemp("rt")
    export(model, root / "m.onnx", exporter="torchscript", threads=1)
    return model, root / "m.onnx", root


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 256, (20, 1, 16, 16), generator=g, dtype=torch.uint8),
                    torch.arange(20) % 5, list("abcde"), (0.5,), (0.25,))


def test_evaluate_gives_the_same_result_as_torch(exported, images):
    model, path, _ = exported
    expected = vitrim.evaluate(model, images, batch_size=8)
    got = vitrim.evaluate(OnnxModel(path, threads=1), images, batch_size=8)
    assert got["accuracy"] == expected["accuracy"] and got["count"] == 20
    assert got["loss"] == pytest.approx(expected["loss"], abs=1e-5)


def test_threads_are_fixed_and_default_to_torch(exported):
    _, path, _ = exported
    assert OnnxModel(path, threads=2)._session.get_session_options().intra_op_num_threads == 2
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runner = OnnxModel(path)
        assert runner.threads == 1
        assert runner._session.get_session_options().intra_op_num_threads == 1
    finally:
        torch.set_num_threads(previous)


def test_profiled_session_records_every_node_of_a_run(exported, tmp_path):
    import json

    from vitrim.quant.onnxfile import session

    _, path, _ = exported
    plain = session(path, 1)
    assert not plain.get_session_options().enable_profiling
    recording = session(path, 1, profile_prefix=str(tmp_path / "prof"))
    name = recording.get_inputs()[0].name
    recording.run(None, {name: torch.zeros(2, 1, 16, 16).numpy()})
    written = recording.end_profiling()
    assert written.startswith(str(tmp_path / "prof"))
    events = json.loads(open(written).read())
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    graph_ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert kernels and all(e["args"].get("op_name") for e in kernels)
    assert {"MatMul", "Softmax"} <= {e["args"]["op_name"] for e in kernels} & graph_ops
    assert sum(e.get("name") == "model_run" for e in events) == 1


def test_latency_timing_works_unchanged(exported):
    _, path, _ = exported
    runner = OnnxModel(path, threads=1)
    entry = measure_latency(runner, 3, runs=3, warmup=1)
    assert entry["median_ms"] > 0 and entry["runs"] == 3
    result = measure_onnx(runner, [1, 2], runs=3, warmup=1)
    assert set(result["latency"]) == {"1", "2"} and result["runtime"] == "onnxruntime"
    assert result["threads"] == 1 and result["scheme"] == "fp32" and result["size_bytes"] == path.stat().st_size
    model, _, _ = exported
    assert result["params"] == sum(p.numel() for p in model.parameters()) and result["flops"] > 0


def _strip_metadata(src, dst):
    proto = onnx.load(str(src))
    del proto.metadata_props[:]
    onnx.save(proto, str(dst))
    return dst


def test_foreign_onnx_asks_for_preprocessing_flags(exported, images):
    model, path, root = exported
    bare = _strip_metadata(path, root / "bare.onnx")
    flags = "--image-size, --in-chans, --mean and --std"
    with pytest.raises(MissingMetadataError, match=f"no vitrim preprocessing metadata.*{flags}"):
        OnnxModel(bare)
    runner = OnnxModel(bare, threads=1, preprocessing=Preprocessing(16, 1, (0.5,), (0.25,)))
    assert runner.config.image_size == 16 and runner.config.num_classes is None
    assert vitrim.evaluate(runner, images)["accuracy"] == vitrim.evaluate(model, images)["accuracy"]
    assert measure_onnx(runner, [1], runs=2, warmup=0)["params"] == sum(p.numel() for p in model.parameters())


def test_preprocessing_that_contradicts_the_graph_is_refused(exported):
    _, path, _ = exported
    with pytest.raises(OnnxFileError, match=r"takes input of shape \['batch', 1, 16, 16\].*\(B, 3, 16, 16\)"):
        OnnxModel(path, preprocessing=Preprocessing(16, 3, (0.5,) * 3, (0.5,) * 3))


@pytest.mark.parametrize("content", [b"", b"hello, I am not a model\n", bytes(range(256)) * 8])
def test_non_onnx_file_gets_a_clear_error(tmp_path, content):
    path = tmp_path / "x.onnx"
    path.write_bytes(content)
    with pytest.raises(OnnxFileError, match="x.onnx is not a valid ONNX model.*corrupt or not ONNX"):
        OnnxModel(path)


def test_truncated_onnx_file_gets_a_clear_error(exported, tmp_path):
    _, path, _ = exported
    data = path.read_bytes()
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(OnnxFileError, match="cut.onnx"):
        OnnxModel(bad)


def test_missing_file(tmp_path):
    with pytest.raises(OnnxFileError, match="does not exist"):
        OnnxModel(tmp_path / "nope.onnx")


def test_wrong_input_shape_and_training_are_refused(exported):
    _, path, _ = exported
    runner = OnnxModel(path, threads=1)
    with pytest.raises(DataError, match=r"expects images of shape \(B, 1, 16, 16\), got \(2, 1, 8, 8\)"):
        runner(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ConfigError, match="cannot be trained"):
        runner.train()
    assert runner.eval() is runner and runner.train(False) is runner


def test_import_vitrim_quant_does_not_load_onnx():
    import subprocess
    import sys

    code = "import sys, vitrim, vitrim.quant; print('onnx' in sys.modules, 'onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"
