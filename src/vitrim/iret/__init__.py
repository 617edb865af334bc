"""The incremental-resolution ViT: coarse tokens first, detail where attention looks (learnable 2-D lifting)."""

from vitrim.iret.lifting import Lifting2D, LiftingStep
from vitrim.iret.model import IncrementalViT, IretOptions, incremental_from_vit, split_patch_embedding

__all__ = ["IncrementalViT", "IretOptions", "Lifting2D", "LiftingStep", "incremental_from_vit",
           "split_patch_embedding"]
