"""Run-time token reduction: attention-guided dropping, EViT fusion and ToMe-style merging."""

from vitrim.tokens.model import METHODS, TokenReducedViT, reduce_tokens, reduced_flops

__all__ = ["METHODS", "TokenReducedViT", "reduce_tokens", "reduced_flops"]
