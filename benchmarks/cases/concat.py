"""Channel and token concatenation fusers (Dense Connector, Lin et al. E_D, ViP-LLaVA) at LLaVA-1.5 scale."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from layerfuse import FusionProjector, Projector, TokenConcatFuser
from layerfuse.presets import build_fusion_projector, preset_plan

from . import FuserCase, llava_features


def _preset(name: str):
    def build(device: torch.device, dtype: torch.dtype, quick: bool) -> tuple[nn.Module, list[Tensor], dict[str, Any]]:
        num_inputs = len(preset_plan(name, depth=24).layers)
        # quick features have 20 tokens, fewer than 3 pool-8 windows; that is still a valid input
        features, scale = llava_features(num_inputs, device=device, dtype=dtype, quick=quick)
        module = build_fusion_projector(name, dim=scale["dim"], llm_dim=scale["llm"], depth=24, device=device, dtype=dtype)
        return module, features, {}

    return build


def _sti_2d(device: torch.device, dtype: torch.dtype, quick: bool) -> tuple[nn.Module, list[Tensor], dict[str, Any]]:
    features, scale = llava_features(3, device=device, dtype=dtype, quick=quick)
    fuser = TokenConcatFuser(scale["dim"], 3, pool="2d", window=(2, 4) if not quick else 2, device=device, dtype=dtype)
    projector = Projector("mlp2x_gelu", scale["dim"], scale["llm"], device=device, dtype=dtype)
    module = FusionProjector(fuser, projector, layers=(23, 7, 15), tokens="patch")
    return module, features, {"grid": scale["grid"]}


CASES = [
    # LLaVA-1.5 itself (one layer, no fusion): the baseline of the ratio columns in benchmarks/fusers.py
    FuserCase("llava15_single_layer", _preset("llava")),
    FuserCase("concat_dc_sci", _preset("dense_connector_sci")),
    FuserCase("concat_dc_dci", _preset("dense_connector_dci")),
    FuserCase("concat_lin_ed_3_18_23", _preset("lin_ed_3_18_23")),
    FuserCase("concat_lin_ed_all", _preset("lin_ed_all")),
    FuserCase("concat_vip_llava", _preset("vip_llava")),
    FuserCase("token_concat_dc_sti", _preset("dense_connector_sti")),
    FuserCase("token_concat_2d", _sti_2d),
]
