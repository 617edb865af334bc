"""A learnable 2-D lifting scheme: one level of a separable wavelet built from predict/update steps.

Each 1-D step splits a signal into even and odd samples, predicts the odd ones from the even
ones (``detail = odd - P(even)``) and updates the even ones with the detail
(``approx = even + U(detail)``). Whatever the filters ``P`` and ``U`` learn, the step stays
exactly invertible. Initialised as the Haar wavelet: ``P`` copies the even sample, ``U`` adds
half the detail, so ``approx`` is the pair's mean and ``detail`` their difference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitrim.errors import ConfigError, DataError


class LiftingStep(nn.Module):
    """One predict/update pair along height (``axis=2``) or width (``axis=3``), per channel."""

    def __init__(self, channels: int, kernel: int, axis: int) -> None:
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ConfigError(f"lifting filters need an odd length, got {kernel}")
        self.channels, self.kernel, self.axis = channels, kernel, axis
        shape = (channels, 1, kernel, 1) if axis == 2 else (channels, 1, 1, kernel)
        self.predict = nn.Parameter(torch.zeros(shape))
        self.update = nn.Parameter(torch.zeros(shape))
        self.reset_to_haar()

    def reset_to_haar(self) -> None:
        with torch.no_grad():
            centre = self.kernel // 2
            self.predict.zero_()
            self.update.zero_()
            self.predict.view(self.channels, -1)[:, centre] = 1.0
            self.update.view(self.channels, -1)[:, centre] = 0.5

    def _filter(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        half = self.kernel // 2
        pad = (0, 0, half, half) if self.axis == 2 else (half, half, 0, 0)
        return F.conv2d(F.pad(x, pad, mode="replicate"), weight, groups=self.channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # -> (approx, detail)
        even = x[:, :, 0::2] if self.axis == 2 else x[..., 0::2]
        odd = x[:, :, 1::2] if self.axis == 2 else x[..., 1::2]
        detail = odd - self._filter(even, self.predict)
        return even + self._filter(detail, self.update), detail

    def inverse(self, approx: torch.Tensor, detail: torch.Tensor) -> torch.Tensor:
        even = approx - self._filter(detail, self.update)
        odd = detail + self._filter(even, self.predict)
        return torch.stack([even, odd], dim=self.axis + 1).flatten(self.axis, self.axis + 1)


class Lifting2D(nn.Module):
    """Rows, then columns: images (B, C, H, W) -> low band LL (B, C, H/2, W/2) and the three
    detail bands stacked as (B, 3C, H/2, W/2) in the order LH, HL, HH."""

    def __init__(self, channels: int, kernel: int = 3, learnable: bool = True) -> None:
        super().__init__()
        self.rows = LiftingStep(channels, kernel, axis=2)
        self.cols_low = LiftingStep(channels, kernel, axis=3)
        self.cols_high = LiftingStep(channels, kernel, axis=3)
        self.learnable = learnable
        self.requires_grad_(learnable)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.shape[-1] % 2 or images.shape[-2] % 2:
            raise DataError(f"the lifting scheme halves height and width; got {tuple(images.shape[-2:])}")
        low, high = self.rows(images)
        ll, lh = self.cols_low(low)
        hl, hh = self.cols_high(high)
        return ll, torch.cat([lh, hl, hh], dim=1)

    def inverse(self, ll: torch.Tensor, details: torch.Tensor) -> torch.Tensor:
        lh, hl, hh = details.chunk(3, dim=1)
        return self.rows.inverse(self.cols_low.inverse(ll, lh), self.cols_high.inverse(hl, hh))
