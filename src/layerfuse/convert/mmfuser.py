"""MMFuser's ``mm_projector`` (fuser at ``0.*``, LLaVA MLP at ``1.*``, ``3.*``) as a FusionProjector."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .._checks import check_positive_int
from ..fusers.mmfuser import MMFuser
from ..fusers.pipeline import FusionProjector
from ..layers.projector import Projector
from ..serialization import load_strict
from .state_dict import llava_projector_shape, select_required, target_dtype

__all__ = ["convert_mmfuser", "load_mmfuser_projector"]

# hidden_states indices of MMFuser's `list-22/-17/-12/-7/-2`: four value levels, then the query.
MMFUSER_LAYERS = (-22, -17, -12, -7, -2)
# Keys whose shapes fix the architecture; the rest are checked by the strict load.
_SHAPE_KEYS = ("query_norm.weight", "cross_attn.attention_weights.weight", "self_attn.attention_weights.weight")


def convert_mmfuser(
    state_dict: Mapping[str, Tensor],
    *,
    dtype: torch.dtype | None = None,
    heads: int = 16,
    points: int = 4,
    layers: Sequence[int] = MMFUSER_LAYERS,
    grid: Sequence[int] | None = None,
) -> FusionProjector:
    """Load MMFuser's ``mm_projector`` (``Sequential(MSCrossAttnBlock, Linear, GELU, Linear)``).

    The fuser's width and number of value levels, and the projector's depth and widths, are read from
    the weight shapes. Heads and points cannot be told apart from the shapes (only their product), so
    they are arguments with the authors' defaults, checked against the shapes.

    Args:
        state_dict: keys containing ``mm_projector.`` with any prefix (``model.mm_projector.0.gamma1``,
            ...): the fuser at ``0.*`` and the MLP Linears at ``1.*``, ``3.*``, ... (``linear``
            projectors have only ``1.*``).
        dtype: build in this dtype. Default: the checkpoint's, bf16/fp16 upcast to float32.
        heads: attention heads the model was trained with. Default: ``16``
        points: sampling points per head and level. Default: ``4``
        layers: hidden-state indices feeding the fuser: the value levels, then the query. Default:
            ``(-22, -17, -12, -7, -2)``, MMFuser's ``list-22/-17/-12/-7/-2``.
        grid: default (H, W) patch grid of the fuser (e.g. ``(24, 24)`` for CLIP-L/336); without it,
            the grid comes from [`LayerTap`][layerfuse.LayerTap] features or ``grid=`` at call time.

    Returns:
        ``FusionProjector(MMFuser, Projector)`` with ``layers`` as given and ``tokens="patch"``.

    Raises:
        ValueError: no ``mm_projector.`` key, missing/unexpected keys, heads·points not matching the
            weight shapes, or ``layers`` not matching the number of levels.
    """
    where = "convert_mmfuser"
    selected = select_required(state_dict, "mm_projector", where=where)
    return load_mmfuser_projector(
        selected, dtype=dtype, heads=heads, points=points, layers=layers, grid=grid, where=where, anchor="mm_projector"
    )


def load_mmfuser_projector(
    projector_state: Mapping[str, Tensor],
    *,
    dtype: torch.dtype | None = None,
    heads: int,
    points: int,
    layers: Sequence[int],
    grid: Sequence[int] | None,
    where: str,
    anchor: str,
) -> FusionProjector:
    """Build and strictly load the FusionProjector for an MMFuser-style projector state dict.

    ``projector_state`` has keys relative to the projector ``anchor`` (``0.gamma1``, ``1.weight``, ...);
    MMFuser's ``mm_projector`` and Lin et al.'s E_M ``mm_projector_f`` share this layout.
    """
    check_positive_int(where, "heads", heads)
    check_positive_int(where, "points", points)
    fuser_state = {k[2:]: v for k, v in projector_state.items() if k.startswith("0.")}
    mlp_state = {k: v for k, v in projector_state.items() if not k.startswith("0.")}
    kind, mlp_in, llm_width = llava_projector_shape(mlp_state, where=where, anchor=anchor, first=1)
    missing = [f"{anchor}.0.{k}" for k in _SHAPE_KEYS if k not in fuser_state]
    if missing:
        raise ValueError(f"{where}: missing keys ({len(missing)}): {', '.join(missing)}")

    dim = fuser_state["query_norm.weight"].shape[0]
    per_level = heads * points
    self_rows = fuser_state["self_attn.attention_weights.weight"].shape[0]
    cross_rows = fuser_state["cross_attn.attention_weights.weight"].shape[0]
    if self_rows != per_level or cross_rows % per_level:
        raise ValueError(
            f"{where}: heads={heads} x points={points} = {per_level} does not fit the checkpoint: "
            f"{anchor}.0.self_attn.attention_weights.weight has {self_rows} rows (heads x points) and "
            f"{anchor}.0.cross_attn.attention_weights.weight has {cross_rows} (heads x levels x points); "
            "pass the heads= and points= the model was trained with"
        )
    if dim % heads:
        raise ValueError(f"{where}: heads={heads} does not divide the fuser width {dim} read from the checkpoint")
    num_levels = cross_rows // per_level
    if len(layers) != num_levels + 1:
        raise ValueError(
            f"{where}: layers expected {num_levels + 1} hidden-state indices (the checkpoint has "
            f"{num_levels} value levels, then the query), got {list(layers)}"
        )

    if mlp_in != dim:
        raise ValueError(
            f"{where}: {anchor}.1.weight takes {mlp_in} input channels but the fuser width is {dim}; "
            "the projector must read the fuser output"
        )
    target = target_dtype(projector_state, dtype, where=where)
    fuser = MMFuser(dim, num_levels, heads, points, grid=grid, dtype=target)
    module = FusionProjector(fuser, Projector(kind, dim, llm_width, dtype=target), layers=layers, tokens="patch")
    mapped = {f"fuser.{k}": v.to(target) for k, v in fuser_state.items()}
    for key, value in mlp_state.items():
        # The fuser occupies index 0 of the authors' Sequential, so their Linear 2k+1 is our 2k.
        index, name = key.split(".", 1)
        mapped[f"projector.{int(index) - 1}.{name}"] = value.to(target)
    load_strict(module, mapped, source=f"{where} ({anchor}.*)")
    return module
