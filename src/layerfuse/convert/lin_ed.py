"""Lin et al. (CVPR 2025) external direct fusion (E_D) checkpoints: ``model.mm_projector_f.{0,2}.*``."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..fusers.pipeline import FusionProjector
from ..presets import PresetPlan
from .lin_strategies import lin_selected_layers
from .projector_only import load_projector_behind

__all__ = ["convert_lin_ed"]


def _ed_groups(strategy: str, selected: tuple[int, ...]) -> list[int | tuple[int, ...]]:
    """The channel blocks the authors' ``encode_images`` builds from the tower's selected list."""
    if strategy == "18":
        return [selected[0], selected[1]]
    if strategy == "3-18-23":  # the list is (3, 18, 23, 23); only the first three entries are used
        return [selected[0], selected[1], selected[2]]
    if strategy in ("former", "latter"):
        return [selected[:12], selected[-1]]
    return [selected[:12], selected[12:24], selected[-1]]  # "all"


def convert_lin_ed(
    state_dict: Mapping[str, Tensor],
    *,
    dtype: torch.dtype | None = None,
    strategy: str = "3-18-23",
    tower: str = "clip",
    drop_first_token: bool | None = None,
) -> FusionProjector:
    """Load Lin et al.'s E_D projector ``mm_projector_f`` (Linear, GELU, Linear after a channel concat).

    Channel blocks as coded, final layer last (P_k = hidden state k without token 0):

    | strategy | CLIP-L/14-336 | SigLIP |
    |---|---|---|
    | ``18`` | ``[P18; P23]`` | n/a |
    | ``3-18-23`` | ``[P3; P18; P23]`` | ``[P3; P20; P25]`` |
    | ``former`` | ``[mean(P1..P12); P23]`` | n/a |
    | ``latter`` | ``[mean(P13..P24); P23]`` | ``[mean(P15..P26); P25]`` |
    | ``all`` | ``[mean(P1..P12); mean(P13..P24); P23]`` | n/a |

    **SigLIP drop-first-token (fidelity switch).** The authors' tower strips token 0 from every state
    even for SigLIP, which has no CLS token, so a real patch is lost and 728 of 729 tokens reach the
    LLM (specs §3.9). ``drop_first_token=True`` (the SigLIP default) reproduces that: the returned
    [`ConcatFuser`][layerfuse.ConcatFuser] drops token 0 itself (``tokens="patch"`` keeps all SigLIP tokens).
    ``drop_first_token=False`` keeps all 729 tokens (the projector is per-token, so the weights still
    apply; the LLM then sees one more token than in training). For CLIP the tap drops the CLS token
    and nothing else is dropped.

    Args:
        state_dict: keys containing ``mm_projector_f.`` with any prefix (``model.mm_projector_f.0.weight``);
            other keys (the LLM, ``mm_projectors.{i}``, ``ucross``) are ignored.
        dtype: build in this dtype. Default: the checkpoint's, bf16/fp16 upcast to float32.
        strategy: ``--layer_using_strategy``: ``"18"``, ``"3-18-23"``, ``"former"``, ``"latter"`` or
            ``"all"`` (only ``"3-18-23"`` and ``"latter"`` for SigLIP). Default: ``"3-18-23"``
        tower: ``"clip"`` (CLIP-L/14-336) or ``"siglip"`` (the truncated SigLIP-so400m tower).
            Default: ``"clip"``
        drop_first_token: SigLIP only; see above. Default: ``True`` for SigLIP (as coded).

    Returns:
        ``FusionProjector(ConcatFuser, Projector)`` with the strategy's ``layers`` and ``tokens="patch"``.

    Raises:
        ValueError: unknown strategy or tower, ``"3-18"`` (no E_D projector exists for it),
            ``drop_first_token=True`` with CLIP, missing/unexpected keys, or an input width that does
            not fit the strategy.
    """
    where = "convert_lin_ed"
    selected = lin_selected_layers(strategy, tower, where=where, paradigm="E_D")
    if tower == "clip" and drop_first_token:
        raise ValueError(
            f"{where}: drop_first_token=True is for SigLIP only; with CLIP the tap already drops the CLS "
            "token (tokens='patch') and dropping another token would lose a patch"
        )
    drop = tower == "siglip" and drop_first_token is not False
    groups = _ed_groups(strategy, selected)
    plan = PresetPlan.concat(groups, drop_first_token=drop)
    return load_projector_behind(
        plan, state_dict, dtype=dtype, anchor="mm_projector_f", blocks=len(groups), where=where
    )
