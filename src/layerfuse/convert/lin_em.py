"""Lin et al.'s external modular fusion (E_M): the MMFuser block in ``mm_projector_f``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..fusers.pipeline import FusionProjector
from .lin_strategies import lin_selected_layers
from .mmfuser import load_mmfuser_projector
from .state_dict import select_required

__all__ = ["convert_lin_em"]

# Value levels of each strategy in the authors' E_M builder: the first n entries of the selected list.
# "3-18" builds no E_M projector in their code (it returns None), so no checkpoint can exist for it.
_EM_LEVELS = {"18": 1, "3-18-23": 2, "former": 12, "latter": 12, "all": 24}


def convert_lin_em(
    state_dict: Mapping[str, Tensor],
    *,
    dtype: torch.dtype | None = None,
    strategy: str = "3-18-23",
    heads: int = 16,
    points: int = 4,
    tower: str = "clip",
    grid: Sequence[int] | None = None,
) -> FusionProjector:
    """Load Lin et al.'s E_M projector ``mm_projector_f`` (MMFuser block, then Linear, GELU, Linear).

    The value levels are the first entries of the strategy's layer list and the query is its last
    entry: ``"3-18-23"`` on CLIP-L feeds hidden states (3, 18, 23), 3 and 18 as values and 23 as the
    query. The number of levels in the weights must match the strategy.

    With ``tower="siglip"`` the module keeps all 729 patch tokens of the 27×27 grid: the authors'
    tower drops the first SigLIP patch as if it were a CLS token, which leaves 728 tokens that fit no
    grid, so their E_M crashes on SigLIP and no checkpoint of that configuration can have been trained
    with it.

    Args:
        state_dict: keys containing ``mm_projector_f.`` with any prefix (``model.mm_projector_f.0.gamma1``,
            ...). Other keys (the LLM, ``mm_projectors.{i}``) are ignored.
        dtype: build in this dtype. Default: the checkpoint's, bf16/fp16 upcast to float32.
        strategy: ``--layer_using_strategy``: ``"18"``, ``"3-18-23"``, ``"former"``, ``"latter"`` or
            ``"all"`` (``"3-18-23"`` and ``"latter"`` only for SigLIP). Default: ``"3-18-23"``
        heads: attention heads the model was trained with. Default: ``16``
        points: sampling points per head and level. Default: ``4``
        tower: ``"clip"`` (CLIP-L/14-336, 25 hidden states) or ``"siglip"`` (the truncated
            SigLIP-so400m tower, 27 hidden states). Default: ``"clip"``
        grid: default (H, W) patch grid of the fuser, e.g. ``(24, 24)`` for CLIP-L/336.

    Returns:
        ``FusionProjector(MMFuser, Projector)`` with the strategy's ``layers`` and ``tokens="patch"``.

    Raises:
        ValueError: unknown strategy or tower, ``"3-18"``, missing/unexpected keys, heads·points not
            matching the weights, or a number of levels that does not match the strategy.
    """
    where = "convert_lin_em"
    selected_list = lin_selected_layers(strategy, tower, where=where, paradigm="E_M")
    num_levels = _EM_LEVELS[strategy]
    layers = (*selected_list[:num_levels], selected_list[-1])
    selected = select_required(state_dict, "mm_projector_f", where=where)
    cross_key = "0.cross_attn.attention_weights.weight"
    if cross_key in selected and selected[cross_key].shape[0] != heads * num_levels * points:
        rows = selected[cross_key].shape[0]
        if rows % (heads * points) == 0:
            raise ValueError(
                f"{where}: strategy={strategy!r} fuses {num_levels} value levels but the checkpoint has "
                f"{rows // (heads * points)} (mm_projector_f.{cross_key} has {rows} rows = heads x levels x "
                f"points with heads={heads}, points={points}); pass the strategy it was trained with"
            )
    return load_mmfuser_projector(
        selected,
        dtype=dtype,
        heads=heads,
        points=points,
        layers=layers,
        grid=grid,
        where=where,
        anchor="mm_projector_f",
    )
