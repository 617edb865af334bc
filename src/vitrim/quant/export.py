"""ONNX export with preprocessing metadata and a numeric check against PyTorch."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitrim.errors import ConfigError
from vitrim.quant import deps
from vitrim.quant.calib import CalibInput, calibration_source
from vitrim.quant.check import Agreement, compare
from vitrim.quant.errors import ExportCheckError, ExportError
from vitrim.quant.graphfuse import attention_heads_in_place
from vitrim.quant.metadata import Preprocessing, info_props, write_props
from vitrim.quant.onnxfile import parse_proto, serialize, write_bytes

MIN_OPSET = 18
DEFAULT_OPSET = 23  # scaled_dot_product_attention exports as one Attention node (and GELU as one Gelu)
TORCHSCRIPT_MAX_OPSET = 20
INPUT_NAME, OUTPUT_NAME = "images", "logits"
EXPORTERS = ("auto", "dynamo", "torchscript")
CHECK_IMAGES = 8


@dataclass
class ExportResult:
    """Where the model went, how it was exported, and how closely ORT matches PyTorch."""

    path: Path
    exporter: str
    opset: int
    size_bytes: int
    check: Agreement
    seconds: float
    fallback_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "exporter": self.exporter, "opset": self.opset,
                "size_bytes": self.size_bytes, "check": self.check.to_dict(),
                "seconds": round(self.seconds, 3), "fallback_reason": self.fallback_reason}


def export(model: nn.Module, path: str | Path, *, opset: int = DEFAULT_OPSET, check_images: CalibInput | None = None,
           tolerance: float = 1e-3, exporter: str = "auto", threads: int | None = None,
           preprocessing: Preprocessing | None = None) -> ExportResult:
    """Export ``model`` to ONNX at ``path`` (dynamic batch axis), check it, then write it atomically.

    ``check_images`` (an ``ImageSet`` or normalised ``(N, C, S, S)`` tensor; default 8 seeded random
    images) run through PyTorch and ONNX Runtime; a max abs logit difference above ``tolerance``
    raises :class:`ExportCheckError` and nothing is written. ``exporter="auto"`` tries the
    ``torch.export``-based exporter and falls back to the TorchScript one only if it fails (at
    opset 20 at most, the newest it writes; ``fallback_reason`` then says so, also when
    ``exporter="torchscript"`` was asked for with a newer opset). Attention exported as opset-23
    ``Attention`` nodes takes its heads in place
    (:func:`~vitrim.quant.graphfuse.attention_heads_in_place`), which the numeric check covers.
    """
    started = time.perf_counter()
    proto, used, reason, check = export_proto(model, opset=opset, check_images=check_images,
                                              tolerance=tolerance, exporter=exporter, threads=threads,
                                              preprocessing=preprocessing)
    data = serialize(proto)
    write_bytes(data, path)
    return ExportResult(Path(path), used, _opset_of(proto), len(data), check,
                        time.perf_counter() - started, reason)


def export_proto(model: nn.Module, *, opset: int = DEFAULT_OPSET, check_images: CalibInput | None = None,
                 tolerance: float | None = 1e-3, exporter: str = "auto", threads: int | None = None,
                 preprocessing: Preprocessing | None = None) -> tuple[Any, str, str | None, Agreement]:
    """Export and check in memory: ``(ModelProto, exporter used, fallback reason, agreement)``."""
    from vitrim.quant.runtime import OnnxModel

    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown exporter {exporter!r}; use one of: {', '.join(EXPORTERS)}")
    if opset < MIN_OPSET:
        raise ConfigError(f"opset {opset} is too old; vitrim exports with opset >= {MIN_OPSET}")
    _check_family_exports(model)
    if getattr(model, "mode", None) == "dynamic" and getattr(model, "tau", None) is not None:
        raise ExportError("this token-reduced model keeps a different number of tokens per image (tau=...), "
                          "which an ONNX graph cannot express; build it with mode='static' and keep=RATIO")
    prep = preprocessing or _preprocessing_of(model)
    if check_images is None:
        generator = torch.Generator().manual_seed(0)
        check_images = torch.randn(CHECK_IMAGES, prep.in_chans, prep.image_size, prep.image_size,
                                   generator=generator)
    source = calibration_source(check_images, None, prep)
    example = _example(source)  # (2, C, S, S)
    was_training = model.training
    model.eval()
    try:
        proto, used, reason = _to_proto(model, example, opset, exporter)
        _strip_debug_info(proto)
        fused = attention_heads_in_place(proto)
        write_props(proto, prep.to_props())
        write_props(proto, info_props("export", {"exporter": used, "opset": _opset_of(proto),
                                                 "attention_heads_in_place": fused,
                                                 "torch": torch.__version__}))
        runner = OnnxModel(serialize(proto), threads=threads, name="the exported model")
        head = getattr(model, "dense", None)  # a dense model: agreement over its class channels
        check = compare(model, runner, source.batches(), reference_name="PyTorch", tolerance=tolerance,
                        classes=getattr(head, "num_classes", None))
    finally:
        model.train(was_training)
    if not check.passed:
        raise ExportCheckError(f"the exported model does not match PyTorch: {check.summary()}; nothing "
                               f"was written (raise the tolerance only if the difference is expected)")
    return proto, used, reason, check


def _check_family_exports(model: nn.Module) -> None:
    """Refuse a family whose outputs the exported canonical graph would not reproduce (a detector)."""
    from vitrim.adapters.registry import family_of

    found = family_of(model)
    if found is not None and not found.onnx:
        raise ConfigError(f"{type(model).__name__} ({found.name}) does not export to ONNX with vitrim: the "
                          f"exported graph would not give the model's own outputs; export it with its own tools")


def _preprocessing_of(model: nn.Module) -> Preprocessing:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "image_size"):
        raise ConfigError(f"{type(model).__name__} has no vitrim config; pass preprocessing=Preprocessing(...) "
                          f"with image size, channels, mean and std")
    from vitrim.models import ViTConfig

    if isinstance(cfg, ViTConfig):
        return Preprocessing.from_config(cfg)
    return Preprocessing(cfg.image_size, cfg.in_chans, cfg.mean, cfg.std, getattr(cfg, "class_names", None),
                         getattr(cfg, "num_classes", None))


def _example(source: Any) -> torch.Tensor:
    first = next(source.batches())
    if first.shape[0] >= 2:
        return first[:2].clone()
    return torch.cat([first, first])  # a batch of 2 keeps the batch axis symbolic


def _to_proto(model: nn.Module, example: torch.Tensor, opset: int, exporter: str) -> tuple[Any, str, str | None]:
    errors: list[str] = []
    if exporter in ("auto", "dynamo"):
        try:
            return _dynamo(model, example, opset), "dynamo", None
        except Exception as exc:  # the exporter raises many kinds; the fallback decides
            errors.append(f"dynamo exporter: {_first_line(exc)}")
            if exporter == "dynamo":
                raise ExportError(f"ONNX export failed ({errors[0]})") from None
    try:
        proto = _torchscript(model, example, min(opset, TORCHSCRIPT_MAX_OPSET))
    except Exception as exc:
        errors.append(f"TorchScript exporter: {_first_line(exc)}")
        raise ExportError(f"ONNX export failed ({'; '.join(errors)})") from None
    if opset > TORCHSCRIPT_MAX_OPSET:
        errors.append(f"the TorchScript exporter writes opset {TORCHSCRIPT_MAX_OPSET} at most, not {opset}")
    return proto, "torchscript", "; ".join(errors) or None


def _dynamo(model: nn.Module, example: torch.Tensor, opset: int) -> Any:
    deps.onnx()
    deps.ort()
    batch = torch.export.Dim("batch")
    with deps.quiet():
        program = torch.onnx.export(model, (example,), None, dynamo=True, opset_version=opset,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=({0: batch},), verbose=False)
    return program.model_proto


def _torchscript(model: nn.Module, example: torch.Tensor, opset: int) -> Any:
    buffer = io.BytesIO()
    with deps.quiet():
        torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    return parse_proto(buffer.getvalue(), "the TorchScript export")


def _strip_debug_info(proto: Any) -> None:
    """Drop per-node stack traces and source paths the exporter records (often most of the file)."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    proto.graph.doc_string = ""


def _opset_of(proto: Any) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
