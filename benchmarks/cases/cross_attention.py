"""Dense deep-query cross-attention fuser, full and windowed, at LLaVA-1.5 scale (MMFuser's layers)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from layerfuse import CrossAttentionFuser, FusionProjector, Projector

from . import FuserCase, llava_features

# MMFuser's layer choice: four key/value layers, the penultimate block as the query.
LAYERS = (-22, -17, -12, -7, -2)


def _builder(window: int | None):
    def build(device: torch.device, dtype: torch.dtype, quick: bool) -> tuple[nn.Module, list[Tensor], dict[str, Any]]:
        features, scale = llava_features(len(LAYERS), device=device, dtype=dtype, quick=quick)
        dim = scale["dim"]
        # the quick grid (4x5) is smaller than a 7x7 window
        win = window if window is None or not quick else min(window, 3)
        fuser = CrossAttentionFuser(
            dim, num_levels=len(LAYERS) - 1, heads=4 if quick else 16, window=win, grid=scale["grid"],
            device=device, dtype=dtype,
        )
        projector = Projector("mlp2x_gelu", dim, scale["llm"], device=device, dtype=dtype)
        return FusionProjector(fuser, projector, layers=LAYERS, tokens="patch"), features, {}

    return build


CASES = [
    FuserCase("cross_attention_full", _builder(None)),
    FuserCase("cross_attention_window7", _builder(7)),
]
