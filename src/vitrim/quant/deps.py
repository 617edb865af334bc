"""Lazy access to the optional ``vitrim[onnx]`` dependencies, and quieting their chatter."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from types import ModuleType

from vitrim.quant.errors import MissingDependencyError

INSTALL_HINT = "install the extra with: pip install 'vitrim[onnx]' (onnx, onnxruntime, onnxscript)"


def _require(name: str) -> ModuleType:
    try:
        return __import__(name)
    except ImportError as exc:
        raise MissingDependencyError(f"{name} is not installed ({exc}); {INSTALL_HINT}") from None


def onnx() -> ModuleType:
    """The ``onnx`` package, or a clear error naming the extra to install."""
    return _require("onnx")


def ort() -> ModuleType:
    """The ``onnxruntime`` package, or a clear error naming the extra to install."""
    return _require("onnxruntime")


def nbits_quantizer() -> ModuleType:
    """ORT's MatMulNBits quantizer module, imported without its global ``logging.basicConfig``."""
    ort()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    return matmul_nbits_quantizer


VERBOSE = False  # set by ``vitrim --verbose``: third-party output and full traces pass through


def _chatty_loggers() -> list[logging.Logger]:
    """Root, ORT, onnxscript and every ``torch.*`` logger (torch sets levels on its children, so
    the parent's level does not reach them: a failed ``torch.export`` logs its whole graph)."""
    names = {"", "onnxruntime", "onnxscript"} | {n for n in logging.root.manager.loggerDict if n.startswith("torch")}
    return [logging.getLogger(n) for n in sorted(names)]


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Silence exporter/quantizer progress prints, warnings and INFO logs; yields the captured text.

    With :data:`VERBOSE` nothing is silenced (the captured text stays empty).
    """
    captured = io.StringIO()
    if VERBOSE:
        yield captured
        return
    loggers = _chatty_loggers()
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured):
            warnings.simplefilter("ignore")
            yield captured
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)
