"""Calibration images: checked once, batched on demand, fed to ORT's calibrators."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vitrim.data.dataset import ImageSet
from vitrim.quant.errors import CalibrationError
from vitrim.quant.metadata import Preprocessing

CalibInput = ImageSet | torch.Tensor | Sequence[torch.Tensor]


@dataclass
class CalibrationSource:
    """``count`` checked images, served as normalised ``(B, C, S, S)`` batches at ``image_size``."""

    data: ImageSet | torch.Tensor
    count: int
    image_size: int
    batch_size: int = 32

    def batches(self) -> Iterator[torch.Tensor]:
        """A fresh pass over the images, ``(B, C, S, S)`` float32 per batch."""
        if isinstance(self.data, ImageSet):
            for x, _ in self.data.batches(self.batch_size, image_size=self.image_size):
                yield x.float().contiguous()
        else:
            yield from (x.contiguous() for x in self.data.split(self.batch_size))


def calibration_source(calib: CalibInput | None, count: int | None, prep: Preprocessing,
                       batch_size: int = 32) -> CalibrationSource:
    """Validate ``calib`` against the model and keep its first ``count`` images (all if None).

    An ``ImageSet`` is normalised with its own mean/std and resized to the model's input size;
    tensors must already be normalised model inputs of shape ``(N, C, S, S)``.
    """
    if calib is None:
        raise CalibrationError("this scheme needs calibration images; pass calib=ImageSet or a tensor "
                               "(CLI: --calib N with --data)")
    if count is not None and count < 1:
        raise CalibrationError(f"the calibration size must be positive, got {count}")
    if isinstance(calib, ImageSet):
        available = len(calib)
        if calib.channels != prep.in_chans:
            raise CalibrationError(f"calibration images have {calib.channels} channel(s) but the model "
                                   f"expects {prep.in_chans}")
    else:
        calib = _stack(calib)
        available = calib.shape[0]
        expected = (prep.in_chans, prep.image_size, prep.image_size)
        if calib.ndim != 4 or tuple(calib.shape[1:]) != expected:
            raise CalibrationError(f"calibration tensor must be (N, {', '.join(map(str, expected))}), "
                                   f"got {tuple(calib.shape)}")
        if not torch.isfinite(calib).all():
            raise CalibrationError("calibration tensor holds NaN or infinite values")
    if available == 0:
        raise CalibrationError("the calibration set is empty; give at least one image")
    wanted = available if count is None else count
    if wanted > available:
        raise CalibrationError(f"asked for {wanted} calibration images but the set has only {available}; "
                               f"lower --calib or use a larger split")
    data = calib.subset(wanted) if isinstance(calib, ImageSet) else calib[:wanted].float()
    return CalibrationSource(data, wanted, prep.image_size, batch_size)


def _stack(calib: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    if isinstance(calib, torch.Tensor):
        return calib.detach().cpu()
    try:
        parts = [t.detach().cpu() for t in calib]
    except (TypeError, AttributeError):
        raise CalibrationError(f"calibration data must be an ImageSet, a tensor or a list of tensors, "
                               f"got {type(calib).__name__}") from None
    if not parts:
        raise CalibrationError("the calibration set is empty; give at least one image")
    try:
        return torch.cat([p if p.ndim == 4 else p.unsqueeze(0) for p in parts])
    except RuntimeError as exc:
        raise CalibrationError(f"calibration tensors do not stack into one batch: {exc}") from None


def ort_reader(source: CalibrationSource, input_name: str) -> Any:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over ``source``."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = source.batches()

        def get_next(self) -> dict[str, Any] | None:
            x = next(self._batches, None)
            return None if x is None else {input_name: x.cpu().numpy()}

    return _Reader()
