"""Fusers: modules that combine per-layer ViT features into one sequence of visual tokens."""

from .base import Fuser
from .concat import ConcatFuser
from .cross_attention import CrossAttentionFuser
from .instruction_gated import GatedFusion, InstructionGatedFuser, gate_entropy_loss
from .mmfuser import MMFuser
from .pipeline import FusionProjector
from .token_concat import TokenConcatFuser
from .weighted_sum import WeightedSumFuser

__all__ = [
    "ConcatFuser",
    "CrossAttentionFuser",
    "Fuser",
    "FusionProjector",
    "GatedFusion",
    "InstructionGatedFuser",
    "MMFuser",
    "TokenConcatFuser",
    "WeightedSumFuser",
    "gate_entropy_loss",
]
