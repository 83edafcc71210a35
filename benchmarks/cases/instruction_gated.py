"""IGVA's instruction-gated fuser: 24 CLIP-L hidden states with CLS in 4 groups plus the base layer."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from layerfuse import FusionProjector, InstructionGatedFuser, Projector
from layerfuse.fusers.instruction_gated import IGVA_GROUPS

from . import FuserCase, llava_features

# MPNet's 768-d instruction embedding (tiny under --quick); the gate is as wide as the vision features
# (1024 at LLaVA-1.5 scale, 4 blocks of 4 heads) and the projector reads [base ; fused] = 2 x 1024.
TEXT_DIM = {False: 768, True: 16}


def _build(device: torch.device, dtype: torch.dtype, quick: bool) -> tuple[nn.Module, list[Tensor], dict[str, Any]]:
    num_inputs = sum(len(g) for g in IGVA_GROUPS) + 1
    features, scale = llava_features(num_inputs, device=device, dtype=dtype, quick=quick, tokens_extra=1)
    dim, text_dim = scale["dim"], TEXT_DIM[quick]
    fuser = InstructionGatedFuser(dim, text_dim, gate_dim=dim, device=device, dtype=dtype)
    module = FusionProjector(
        fuser, Projector("mlp2x_gelu", fuser.out_dim, scale["llm"], device=device, dtype=dtype),
        layers=fuser.layers, tokens="cls_patch",
    )
    text = torch.nn.functional.normalize(torch.randn(scale["batch"], text_dim, device=device), dim=-1)
    return module, features, {"text": text.to(dtype)}


CASES = [FuserCase("instruction_gated_igva", _build)]
