"""Reusable building blocks of the fusers."""

from .attention import Attention
from .deformable_attention import MultiScaleDeformableAttention
from .instruction_gate import InstructionGate
from .layer_scale import LayerScale
from .pos_embed import sincos_2d
from .projector import Projector, build_projector

__all__ = [
    "Attention",
    "InstructionGate",
    "LayerScale",
    "MultiScaleDeformableAttention",
    "Projector",
    "build_projector",
    "sincos_2d",
]
