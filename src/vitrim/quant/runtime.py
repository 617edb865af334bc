"""Run an ONNX model in ONNX Runtime behind the same call shape as a vitrim model."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vitrim.errors import ConfigError, DataError
from vitrim.models import ViTConfig
from vitrim.quant.errors import OnnxFileError
from vitrim.quant.metadata import Preprocessing, read_info, read_props
from vitrim.quant.onnxfile import load_proto, parse_proto, session


class OnnxModel:
    """An ONNX Runtime session that takes and returns torch tensors: ``(B, C, S, S) -> (B, classes)``.

    ``threads`` fixes ORT's intra-op threads (default: ``torch.get_num_threads()``, so torch and
    ORT are timed alike). Preprocessing comes from the file's vitrim metadata, or from
    ``preprocessing`` for ONNX files made elsewhere; with neither, loading raises
    :class:`~vitrim.quant.errors.MissingMetadataError`. Works with ``vitrim.evaluate`` and
    ``vitrim.bench.measure_latency``.
    """

    training = False

    def __init__(self, source: str | Path | bytes, *, threads: int | None = None,
                 preprocessing: Preprocessing | None = None, name: str | None = None) -> None:
        in_memory = isinstance(source, bytes)
        self.path: Path | None = None if in_memory else Path(source)
        self.name = name or ("the in-memory ONNX model" if in_memory else str(source))
        proto = parse_proto(source, self.name) if in_memory else load_proto(source)
        self.metadata = read_props(proto)
        self.stored_elements = sum(math.prod(t.dims) for t in proto.graph.initializer)
        self.preprocessing = preprocessing or Preprocessing.from_props(self.metadata, self.name)
        self.threads = threads or torch.get_num_threads()
        self.size_bytes = len(source) if in_memory else self.path.stat().st_size
        self._session = session(source if in_memory else self.path, self.threads, self.name)
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1:
            raise OnnxFileError(f"{self.name} has {len(inputs)} inputs; vitrim runs image classifiers "
                                f"with one image input")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        self._check_declared_shape(inputs[0].shape)
        self.num_outputs = self._declared_outputs(outputs[0].shape)

    @property
    def config(self) -> ViTConfig | Preprocessing:
        """The vitrim ``ViTConfig`` when the file carries one, else the preprocessing record."""
        return self.preprocessing.config or self.preprocessing

    @property
    def quantization(self) -> dict[str, Any] | None:
        """How the model was quantized (scheme, calibrator, ...) or ``None`` for a float model."""
        return read_info(self.metadata, "quant")

    def eval(self) -> "OnnxModel":
        return self

    def train(self, mode: bool = True) -> "OnnxModel":
        if mode:
            raise ConfigError(f"{self.name} runs in ONNX Runtime and cannot be trained")
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, S, S) -> (B, classes)
        p = self.preprocessing
        if x.ndim != 4 or tuple(x.shape[1:]) != (p.in_chans, p.image_size, p.image_size):
            raise DataError(f"{self.name} expects images of shape (B, {p.in_chans}, {p.image_size}, "
                            f"{p.image_size}), got {tuple(x.shape)}")
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (out,) = self._session.run([self.output_name], {self.input_name: array})
        return torch.from_numpy(out)

    def _check_declared_shape(self, shape: Sequence[Any]) -> None:
        p = self.preprocessing
        declared = list(shape)[1:]
        expected = [p.in_chans, p.image_size, p.image_size]
        if len(declared) != 3 or any(isinstance(d, int) and d != e for d, e in zip(declared, expected)):
            raise OnnxFileError(f"{self.name} takes input of shape {list(shape)} but its preprocessing says "
                                f"(B, {p.in_chans}, {p.image_size}, {p.image_size}); check --image-size "
                                f"and --in-chans")

    def _declared_outputs(self, shape: Sequence[Any]) -> int | None:
        """How many logits the model returns, as its graph declares (``None`` when symbolic or not 2-D)."""
        dims = list(shape or [])
        return dims[-1] if len(dims) == 2 and isinstance(dims[-1], int) and dims[-1] > 0 else None

    def __repr__(self) -> str:
        scheme = (self.quantization or {}).get("scheme", "fp32")
        return f"OnnxModel({self.name!r}, scheme={scheme}, threads={self.threads})"
