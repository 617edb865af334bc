"""Which device models and batches run on: ``resolve_device("auto" | "cpu" | "cuda" | "cuda:N" | "mps")``.

Every library function that runs a model takes ``device=`` (a spec or a :class:`torch.device`) and
moves the model, its batches and its accumulators there; the CLI's ``--device`` passes the spec
through. A device this machine lacks is a :class:`~vitrim.errors.ConfigError` naming the fix.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitrim.errors import ConfigError

DEVICE_HELP = "auto (CUDA, else MPS, else CPU) | cpu | cuda | cuda:N | mps"
DeviceSpec = str | torch.device | None


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(spec: DeviceSpec = "auto") -> torch.device:
    """The :class:`torch.device` for ``spec``: ``"auto"`` (or ``None``) is CUDA when available, else
    MPS when available, else the CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` and ``"mps"`` are checked
    against this machine. A :class:`ConfigError` (one line with the fix) when the device is missing."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    text = str(spec).strip().lower()
    try:
        device = spec if isinstance(spec, torch.device) else torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {str(spec)!r}; use {DEVICE_HELP}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"CUDA is not available on this machine (torch {torch.__version__}); "
                              f"use --device cpu or auto")
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= count:
            raise ConfigError(f"device cuda:{index} does not exist: this machine has {count} CUDA device(s); "
                              f"use cuda:0 .. cuda:{count - 1}, or --device auto")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not _mps_available():
            raise ConfigError(f"MPS is not available on this machine (torch {torch.__version__}); "
                              f"use --device cpu or auto")
        return torch.device("mps")
    raise ConfigError(f"unknown device {str(spec)!r}; use {DEVICE_HELP}")


def module_device(model: Any) -> torch.device:
    """The device of ``model``'s first parameter or buffer (the CPU when it has none, or is no module)."""
    if isinstance(model, nn.Module):
        for tensor in model.parameters():
            return tensor.device
        for tensor in model.buffers():
            return tensor.device
    inner = getattr(model, "model", None)
    return module_device(inner) if isinstance(inner, nn.Module) else torch.device("cpu")


def to_device(model: Any, device: torch.device) -> Any:
    """``model`` moved to ``device`` when it is a torch module (or wraps one as ``.model``);
    other runners (ONNX Runtime sessions) are returned as they are."""
    if isinstance(model, nn.Module):
        return model.to(device)
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):
        inner.to(device)
    return model


def synchronize(device: torch.device) -> None:
    """Wait for the queued kernels on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@contextlib.contextmanager
def autocast(device: torch.device, bf16: bool) -> Iterator[None]:
    """bf16 autocast on ``device`` when ``bf16`` (else nothing)."""
    if not bf16:
        yield
        return
    with torch.autocast(device.type, dtype=torch.bfloat16):
        yield


def cpu_name() -> str:
    """This machine's CPU model (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device, dtype: torch.dtype | str = torch.float32) -> dict[str, Any]:
    """What a report names: the device type and name (CPU model, or GPU name with the CUDA and
    cuDNN versions) and the dtype."""
    info: dict[str, Any] = {"device": str(device), "dtype": str(dtype).replace("torch.", "")}
    if device.type == "cuda":
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        info.update(name=torch.cuda.get_device_name(device), cuda=torch.version.cuda, cudnn=cudnn)
    elif device.type == "mps":
        info.update(name=f"Apple MPS ({platform.machine()})")
    else:
        info.update(name=cpu_name())
    return info


def device_label(device: torch.device) -> str:
    """A short name for cache keys and tables: the CPU model, or ``cuda:<GPU name>``."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    if device.type == "mps":
        return "mps"
    return cpu_name()


__all__ = ["DEVICE_HELP", "autocast", "cpu_name", "device_info", "device_label", "module_device",
           "resolve_device", "synchronize", "to_device"]
