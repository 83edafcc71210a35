"""IGVA's ``vision_aggregator`` + ``mm_projector`` (or the stage-1 projector alone) as a FusionProjector."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .._checks import check_positive_int
from ..fusers.instruction_gated import IGVA_GROUPS, InstructionGatedFuser
from ..fusers.pipeline import FusionProjector
from ..layers.projector import Projector
from ..serialization import load_strict
from .state_dict import llava_projector_shape, select_prefixed, select_required, target_dtype

__all__ = ["convert_igva", "gate_key_from_official", "gate_key_to_official"]

_BLOCK_KEY = re.compile(r"^transformers\.(\d+)\.")
# Keys whose shapes fix the gate's architecture; the rest are checked by the strict load.
_SHAPE_KEYS = ("sentence_proj.weight", "cls_proj.weight", "linear.weight")


def convert_igva(
    state_dict: Mapping[str, Tensor],
    *,
    dtype: torch.dtype | None = None,
    groups: Sequence[Sequence[int]] = IGVA_GROUPS,
    base_layer: int = -2,
    heads: int = 4,
    average: bool = False,
) -> FusionProjector:
    """Load an IGVA checkpoint: the instruction-guided aggregator and the projector of width 2C.

    The gate's widths (instruction E, vision C, gate h, groups K) and its number of blocks, and the
    projector's depth and widths, are read from the weight shapes. The number of heads cannot be read
    from the shapes, so it is an argument with the authors' default, checked to divide h.

    Args:
        state_dict: model-level keys with any prefix: ``model.vision_aggregator.*`` and
            ``model.mm_projector.{0,2}.*`` (a stage-2 checkpoint), or ``mm_projector.*`` alone (the
            stage-1 ``mm_projector.bin``, with ``average=True``). Other keys (the LLM) are ignored.
        dtype: build in this dtype. Default: the checkpoint's, bf16/fp16 upcast to float32.
        groups: the ``vit_aggregate_groups`` the model was trained with (hidden-state indices).
            Default: ``[[1..6], [7..12], [13..18], [19..24]]``
        base_layer: ``vit_base_layer``, concatenated first on channels. Default: ``-2``
        heads: attention heads of the aggregator blocks. Default: ``4``
        average: the stage-1 model (``aggregate_by_average``): no aggregator, the uniform mean of the
            groups. Default: ``False``

    Returns:
        ``FusionProjector(InstructionGatedFuser, Projector)`` with ``layers`` = the groups' layers then
        ``base_layer``, and ``tokens="cls_patch"``. Call it as ``module(features, text=embeddings)``
        (without ``text`` when ``average=True``).

    Raises:
        ValueError: no ``mm_projector.`` key, aggregator keys missing (stage 2) or present (stage 1),
            missing/unexpected keys, a number of groups or widths that do not fit, or ``heads`` not
            dividing the gate width.
    """
    where = "convert_igva"
    check_positive_int(where, "heads", heads)
    projector_state = select_required(state_dict, "mm_projector", where=where)
    gate_state = select_prefixed(state_dict, "vision_aggregator", where=where)
    kind, in_dim, llm_width = llava_projector_shape(projector_state, where=where)
    if in_dim % 2:
        raise ValueError(
            f"{where}: mm_projector.0.weight has {in_dim} input columns; IGVA's projector reads [base ; fused], "
            "an even width 2C"
        )
    dim = in_dim // 2
    target = target_dtype({**projector_state, **gate_state}, dtype, where=where)

    if average:
        if gate_state:
            raise ValueError(
                f"{where}: average=True builds the stage-1 model, which has no aggregator, but the checkpoint "
                f"holds {len(gate_state)} vision_aggregator.* keys; pass average=False to load them"
            )
        fuser = InstructionGatedFuser(dim, groups=groups, base_layer=base_layer, gated=False, dtype=target)
    else:
        fuser = _gated_fuser(gate_state, dim=dim, groups=groups, base_layer=base_layer, heads=heads,
                             dtype=target, where=where)

    module = FusionProjector(
        fuser, Projector(kind, in_dim, llm_width, dtype=target), layers=fuser.layers, tokens="cls_patch"
    )
    mapped = {f"projector.{k}": v.to(target) for k, v in projector_state.items()}
    mapped.update({f"fuser.gate.{gate_key_from_official(k)}": v.to(target) for k, v in gate_state.items()})
    load_strict(module, mapped, source=f"{where} (vision_aggregator.*, mm_projector.*)")
    return module


# the authors' name (nn.MultiheadAttention's) -> ours, which no LLM's LoRA name list can reach
_GATE_RENAMES = ((".cross_attention.out_proj.", ".cross_attention.mix_heads."),)


def gate_key_from_official(key: str) -> str:
    """A ``vision_aggregator.*`` key (without the prefix) as the key of layerfuse's ``InstructionGate``."""
    for theirs, ours in _GATE_RENAMES:
        key = key.replace(theirs, ours)
    return key


def gate_key_to_official(key: str) -> str:
    """The inverse of [`gate_key_from_official`][layerfuse.convert.igva.gate_key_from_official]."""
    for theirs, ours in _GATE_RENAMES:
        key = key.replace(ours, theirs)
    return key


def _gated_fuser(
    gate_state: Mapping[str, Tensor],
    *,
    dim: int,
    groups: Sequence[Sequence[int]],
    base_layer: int,
    heads: int,
    dtype: torch.dtype,
    where: str,
) -> InstructionGatedFuser:
    if not gate_state:
        raise ValueError(
            f"{where}: no key contains 'vision_aggregator.'; a stage-2 IGVA checkpoint holds the aggregator. "
            "For the stage-1 mm_projector.bin (uniform average, no aggregator) pass average=True"
        )
    missing = [f"vision_aggregator.{k}" for k in _SHAPE_KEYS if k not in gate_state]
    blocks = sorted({int(m.group(1)) for k in gate_state if (m := _BLOCK_KEY.match(k)) is not None})
    if not blocks or blocks != list(range(len(blocks))):
        missing.append(
            f"vision_aggregator.transformers.{{0, 1, ...}}.*: a run of blocks numbered from 0 "
            f"(found {blocks or 'none'})"
        )
    if missing:
        raise ValueError(f"{where}: missing keys ({len(missing)}): {', '.join(missing)}")
    gate_dim, text_dim = gate_state["sentence_proj.weight"].shape
    summary_dim = gate_state["cls_proj.weight"].shape[1]
    num_groups = gate_state["linear.weight"].shape[0]
    if summary_dim != dim:
        raise ValueError(
            f"{where}: vision_aggregator.cls_proj.weight reads width {summary_dim} but mm_projector.0.weight "
            f"has {2 * dim} input columns = 2 x {dim}; the two must describe one vision width"
        )
    if num_groups != len(groups):
        raise ValueError(
            f"{where}: vision_aggregator.linear.weight gives {num_groups} groups but groups= has "
            f"{len(groups)}: {[list(g) for g in groups]}; pass the vit_aggregate_groups the model was trained with"
        )
    if gate_dim % heads:
        raise ValueError(
            f"{where}: heads={heads} does not divide the aggregator width {gate_dim} read from the checkpoint"
        )
    return InstructionGatedFuser(
        dim, text_dim, groups=groups, base_layer=base_layer, gate_dim=gate_dim, num_blocks=len(blocks),
        num_heads=heads, dtype=dtype,
    )
