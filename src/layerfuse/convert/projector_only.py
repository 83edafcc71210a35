"""Checkpoints of parameter-free fusions: the weights are only a LLaVA projector behind the fuser."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..fusers.pipeline import FusionProjector
from ..layers.projector import Projector
from ..presets import PresetPlan
from ..serialization import load_strict
from .state_dict import llava_projector_shape, select_required, target_dtype

__all__ = ["load_projector_behind"]


def load_projector_behind(
    plan: PresetPlan,
    state_dict: Mapping[str, Tensor],
    *,
    dtype: torch.dtype | None = None,
    anchor: str,
    blocks: int,
    where: str,
) -> FusionProjector:
    """Build ``plan``'s fuser plus the projector stored under ``anchor`` and load it strictly.

    The ViT width C is inferred from the projector's input width, which is ``blocks * C`` (the number
    of channel blocks the fuser concatenates). The module is built in the target dtype before loading,
    so an explicit float64 keeps every bit of the checkpoint.
    """
    selected = select_required(state_dict, anchor, where=where)
    kind, in_dim, out_dim = llava_projector_shape(selected, where=where, anchor=anchor)
    if in_dim % blocks:
        raise ValueError(
            f"{where}: {anchor}.0.weight has {in_dim} input columns, expected {blocks} x the ViT width for this "
            "configuration; the checkpoint was trained with another variant/strategy"
        )
    build_dtype = target_dtype(selected, dtype, where=where)
    fuser = plan.build(in_dim // blocks, dtype=build_dtype)
    projector = Projector(kind, in_dim, out_dim, dtype=build_dtype)
    module = FusionProjector(fuser, projector, layers=plan.layers, tokens=plan.tokens)
    load_strict(module.projector, selected, source=f"{where} (keys under {anchor}.)")
    return module
