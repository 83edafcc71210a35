"""Internal fusion: visual features injected inside the decoder layers of a Hugging Face LLM.

- [`InternalDirect`][layerfuse.internal.InternalDirect]: Lin et al.'s I_D, per-layer projectors added at
  the image tokens before proportionally mapped decoder layers.
- [`InternalModular`][layerfuse.internal.InternalModular]: Lin et al.'s I_M, gated cross-attention blocks
  (``mode="corrected"`` by default, ``mode="authors"`` as coded).
- [`DeepStack`][layerfuse.internal.DeepStack]: Qwen3-VL's DeepStack, 2x2-merged levels added after decoder
  layers 0..K-1.

transformers is never imported here: the LLM is handled through its module attributes.
"""

from .base import DECODER_LAYER_PATHS, InternalFusion, find_decoder_layers
from .deepstack import DeepStack, PatchMerger, window_order
from .direct import InternalDirect
from .layer_maps import LIN_INTERNAL_STRATEGIES, deepstack_layer_map, lin_layer_map
from .modular import GatedCrossAttentionBlock, InternalModular, TanhGate

__all__ = [
    "DECODER_LAYER_PATHS",
    "LIN_INTERNAL_STRATEGIES",
    "DeepStack",
    "GatedCrossAttentionBlock",
    "InternalDirect",
    "InternalFusion",
    "InternalModular",
    "PatchMerger",
    "TanhGate",
    "deepstack_layer_map",
    "find_decoder_layers",
    "lin_layer_map",
    "window_order",
]
