"""MMFuser (deformable deep-query fusion) at LLaVA-1.5 scale: 4 value levels of 24x24 + the query."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from layerfuse import FusionProjector, MMFuser, Projector

from . import FuserCase, llava_features

# The authors' layers: four value levels, then the penultimate block as the query.
LAYERS = (-22, -17, -12, -7, -2)


def build(device: torch.device, dtype: torch.dtype, quick: bool) -> tuple[nn.Module, list[Tensor], dict[str, Any]]:
    features, scale = llava_features(len(LAYERS), device=device, dtype=dtype, quick=quick)
    dim = scale["dim"]
    fuser = MMFuser(dim, num_levels=len(LAYERS) - 1, heads=4 if quick else 16, points=4, grid=scale["grid"],
                    device=device, dtype=dtype)
    projector = Projector("mlp2x_gelu", dim, scale["llm"], device=device, dtype=dtype)
    return FusionProjector(fuser, projector, layers=LAYERS, tokens="patch"), features, {}


CASES = [FuserCase("mmfuser", build)]
