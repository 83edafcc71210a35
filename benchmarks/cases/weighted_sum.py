"""Weighted sums over all 24 CLIP-L layers: plain softmax weights and COMM's LLN-Layerscale."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from layerfuse import FusionProjector, Projector, WeightedSumFuser

from . import FuserCase, llava_features

LAYERS = tuple(range(1, 25))


def _builder(layer_proj: bool):
    def build(device: torch.device, dtype: torch.dtype, quick: bool) -> tuple[nn.Module, list[Tensor], dict[str, Any]]:
        features, scale = llava_features(len(LAYERS), device=device, dtype=dtype, quick=quick)
        fuser = WeightedSumFuser(
            scale["dim"], len(LAYERS), normalize="none" if layer_proj else "softmax", layer_proj=layer_proj,
            device=device, dtype=dtype,
        )
        projector = Projector("mlp2x_gelu", fuser.out_dim, scale["llm"], device=device, dtype=dtype)
        return FusionProjector(fuser, projector, layers=LAYERS, tokens="patch"), features, {}

    return build


CASES = [
    FuserCase("weighted_sum_softmax24", _builder(False)),
    FuserCase("weighted_sum_comm_lln24", _builder(True)),
]
