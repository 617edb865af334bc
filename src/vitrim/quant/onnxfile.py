"""Reading, validating and atomically writing ONNX files; opening ONNX Runtime sessions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vitrim.fsutil import atomic_path
from vitrim.quant import deps
from vitrim.quant.errors import OnnxFileError

TWO_GB = 2**31 - 1
# no busy-waiting of the worker threads between runs
SESSION_CONFIG = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}


def load_proto(path: str | Path) -> Any:
    """Parse an ONNX file into an ``onnx.ModelProto``; a clear error if it is not one."""
    deps.onnx()
    path = Path(path)
    if not path.is_file():
        raise OnnxFileError(f"ONNX file {path} does not exist")
    data = path.read_bytes()
    return parse_proto(data, str(path))


def parse_proto(data: bytes, source: str) -> Any:
    """Parse serialized ONNX bytes, rejecting empty or non-ONNX content."""
    onnx = deps.onnx()
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise OnnxFileError(f"{source} is not a valid ONNX model ({type(exc).__name__}: {exc}); "
                            f"the file is corrupt or not ONNX — re-export it with `vitrim export`") from None
    if proto.ir_version < 1 or not proto.graph.node or not proto.graph.input or not proto.graph.output:
        raise OnnxFileError(f"{source} is not a valid ONNX model (no graph inside); the file is corrupt "
                            f"or not ONNX — re-export it with `vitrim export`")
    return proto


def serialize(proto: Any) -> bytes:
    """Bytes of a model kept in one file (weights inline)."""
    size = proto.ByteSize()
    if size > TWO_GB:
        raise OnnxFileError(f"the ONNX model is {size / 2**30:.1f} GiB; single-file ONNX is limited to "
                            f"2 GiB and vitrim does not write external-data models yet")
    return proto.SerializeToString()


def write_bytes(data: bytes, path: str | Path) -> Path:
    """Write beside the target, then rename over it."""
    path = Path(path)
    if path.is_dir():
        raise OnnxFileError(f"{path} is a directory; give a file path such as {path / 'model.onnx'}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def session(model: str | Path | bytes, threads: int | None = None, source: str | None = None, *,
            profile_prefix: str | None = None) -> Any:
    """A CPU ``InferenceSession`` with ``threads`` intra-op threads (default: torch's count).

    Its worker threads sleep between runs instead of spinning, so a torch model (or another
    session) run right after it gets the cores. ``profile_prefix``: record ORT's per-node
    profile to a JSON file starting with that path (``end_profiling()`` returns its name).
    """
    ort = deps.ort()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    for key, value in SESSION_CONFIG.items():
        options.add_session_config_entry(key, value)
    target = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(target, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises pybind11 Fail / InvalidGraph / InvalidProtobuf ...
        name = source or ("the ONNX model" if isinstance(model, bytes) else str(model))
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxFileError(f"ONNX Runtime cannot load {name}: {first}") from None
