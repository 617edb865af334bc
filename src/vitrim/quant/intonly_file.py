"""``--scheme int-only``: build the integer-only twin, check it against the float model, write its directory."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitrim.fsutil import write_json
from vitrim.models import ViTConfig
from vitrim.quant.calib import CalibInput, calibration_source
from vitrim.quant.check import Agreement, compare
from vitrim.quant.errors import OnnxFileError, QuantizationError
from vitrim.quant.intonly import IntOnlyOptions, IntOnlyViT, int_only
from vitrim.quant.metadata import Preprocessing

STATE_FILE, META_FILE = "intonly.safetensors", "intonly.json"
FORMAT = "vitrim-int-only"


@dataclass
class IntOnlyResult:
    """Where the integer-only model went, its integer size, and its agreement with the float model."""

    path: Path
    options: IntOnlyOptions
    calib_images: int
    size_bytes: int
    fp32_size_bytes: int
    check: Agreement
    seconds: float

    @property
    def compression(self) -> float:
        return self.fp32_size_bytes / self.size_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "scheme": "int-only", "options": asdict(self.options),
                "calib_images": self.calib_images, "size_bytes": self.size_bytes,
                "fp32_size_bytes": self.fp32_size_bytes, "compression": round(self.compression, 3),
                "check": self.check.to_dict(), "seconds": round(self.seconds, 3)}


def quantize_int_only(model: nn.Module, out_dir: str | Path, *, calib: CalibInput, calib_size: int | None = None,
                      options: IntOnlyOptions | None = None, tolerance: float | None = None) -> IntOnlyResult:
    """Integer-only twin of ``model`` with scales from ``calib``; checked on the calibration images
    against the float model (``tolerance``: max abs logit difference allowed), then written to ``out_dir``."""
    started = time.perf_counter()
    source = calibration_source(calib, calib_size, Preprocessing.from_config(model.config))
    images = torch.cat(list(source.batches()))  # (N, C, S, S)
    twin = int_only(model, images, options)
    check = compare(model.eval(), twin, source.batches(), reference_name="PyTorch fp32", tolerance=tolerance)
    if not check.passed:
        raise QuantizationError(f"the integer-only model drifts too far from fp32: {check.summary()}; "
                                f"nothing was written")
    save_int_only(twin, out_dir, {"calib_images": source.count})
    fp32_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return IntOnlyResult(Path(out_dir), twin.options, source.count, twin.size_bytes(), fp32_bytes, check,
                         time.perf_counter() - started)


def is_int_only_dir(path: str | Path) -> bool:
    """True for a directory written by :func:`save_int_only`."""
    return (Path(path) / META_FILE).is_file()


def save_int_only(model: IntOnlyViT, out_dir: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write the integer constants and the config to ``out_dir`` (atomically, file by file)."""
    from vitrim.io import save_state

    out_dir = Path(out_dir)
    save_state(out_dir / STATE_FILE, {k: v.contiguous() for k, v in model.constants.items()})
    write_json(out_dir / META_FILE, {"format": FORMAT, "config": model.config.to_dict(),
                                     "options": asdict(model.options), **(info or {})})
    return out_dir


def load_int_only(path: str | Path) -> IntOnlyViT:
    """Read a directory written by :func:`save_int_only`."""
    from vitrim.io import load_state

    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, not {FORMAT!r}")
        config, options = ViTConfig.from_dict(meta["config"]), IntOnlyOptions(**meta["options"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OnnxFileError(f"{path} is not a readable integer-only model ({type(exc).__name__}: {exc}); "
                            f"write it again with `vitrim quantize MODEL --scheme int-only`") from None
    return IntOnlyViT(config, options, load_state(path / STATE_FILE))
