"""What a block needs to know about a reduced token sequence, and what a token reducer offers.

The canonical ViT runs one forward for every model: a plain sequence carries no state; a
reduced one carries a :class:`TokenState` (how many patches each token stands for, which
slots are padding) that the blocks and the pooling read, and a :class:`TokenReducer` is called
between blocks to shorten the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class TokenState:
    """``sizes`` (B, N): patches each token stands for; ``valid`` (B, N) bool or None: False on
    padding (per-image token counts); ``weighted``: some token stands for several patches, so
    attention adds ``log(size)`` to its logits (proportional attention keeps their mass)."""

    sizes: torch.Tensor
    valid: torch.Tensor | None = None
    weighted: bool = False

    @classmethod
    def initial(cls, x: torch.Tensor) -> "TokenState":
        """Every token one patch, no padding: x (B, N, C)."""
        return cls(torch.ones(x.shape[:2], dtype=x.dtype, device=x.device))

    def attention_bias(self) -> torch.Tensor | None:
        """Additive attention logits (B, 1, 1, N), or None when they would all be zero."""
        bias = self.sizes.clamp_min(1e-12).log() if self.weighted else None
        if self.valid is not None:
            pad = torch.zeros_like(self.sizes).masked_fill(~self.valid, float("-inf"))
            bias = pad if bias is None else bias + pad
        return None if bias is None else bias[:, None, None, :]

    def weights(self) -> torch.Tensor:
        """(B, N) pooling weights: the sizes, zero on padding."""
        return self.sizes if self.valid is None else self.sizes * self.valid


class TokenReducer(Protocol):
    """Shortens the token sequence between blocks.

    ``reduces_after(i)``: whether to reduce after block ``i`` (the block then records its queries
    and keys into a capture dict: ``q``, ``k`` (B, H, N, d), ``scale``, ``bias``);
    ``record(i, state)``: called before block ``i`` (token counts);
    ``reduce(i, x, state, capture)``: the new ``(tokens, state)``.
    """

    def reduces_after(self, block: int) -> bool: ...

    def record(self, block: int, x: torch.Tensor, state: TokenState) -> None: ...

    def reduce(self, block: int, x: torch.Tensor, state: TokenState,
               capture: dict[str, Any]) -> tuple[torch.Tensor, TokenState]: ...


def packed(token_wise, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``token_wise(x)`` computed on the valid tokens only (per-image counts: the padding costs
    nothing); padding gets zeros. x (B, N, C), valid (B, N) or None."""
    if valid is None:
        return token_wise(x)
    result = token_wise(x[valid].unsqueeze(0))[0]  # (T, C'): the T valid tokens of the batch
    out = result.new_zeros(*x.shape[:-1], result.shape[-1])
    out[valid] = result
    return out
