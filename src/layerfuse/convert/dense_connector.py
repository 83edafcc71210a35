"""Dense Connector (Yao et al., NeurIPS 2024) checkpoints: ``model.mm_projector.{0,2}.*``."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .._checks import check_choice
from ..fusers.pipeline import FusionProjector
from ..presets import preset_plan
from .projector_only import load_projector_behind

__all__ = ["DENSE_CONNECTOR_TOWERS", "DENSE_CONNECTOR_VARIANTS", "convert_dense_connector"]

DENSE_CONNECTOR_VARIANTS = ("sti", "sci", "dci")
# Backbone depth whose preset layers equal the authors' hard-coded indices: CLIP-L/14-336 (24 blocks)
# and SigLIP-so400m (27 blocks; the authors' truncated 26-block tower has the same indices 0..26).
DENSE_CONNECTOR_TOWERS = {"clip": 24, "siglip": 27}


def convert_dense_connector(
    state_dict: Mapping[str, Tensor],
    *,
    dtype: torch.dtype | None = None,
    variant: str = "dci",
    tower: str | None = None,
) -> FusionProjector:
    """Load a Dense Connector ``mm_projector`` (the connector itself has no parameters).

    The returned module reproduces the authors' ``encode_images`` output: feed it
    ``LayerTap(vit, module.layers, tokens=module.tokens)(images)``. Layers as coded (HF indices):

    | variant | CLIP-L/14-336 (``tower="clip"``) | SigLIP-so400m (``tower="siglip"``) |
    |---|---|---|
    | ``sti`` | tokens ``[L23; pool8(L7); pool8(L15)]`` | tokens ``[L26; pool8(L7); pool8(L15)]`` |
    | ``sci`` | channels ``[L23; L7; L15]`` | channels ``[L26; L7; L15]`` |
    | ``dci`` | ``[L23; mean(L0..L11); mean(L12..L23)]`` | ``[L26; mean(L0..L12); mean(L13..L25)]`` |

    CLIP drops the CLS token (``tokens="patch"``); SigLIP has none and keeps all its tokens, as the
    authors do. ``pool8`` is their 1-D pooling over raster order ([`TokenConcatFuser`][layerfuse.TokenConcatFuser]).

    Args:
        state_dict: keys containing ``mm_projector.`` with any prefix (``model.mm_projector.0.weight``,
            ``base_model.model.model.mm_projector.0.weight``, or bare ``0.weight`` under
            ``mm_projector``). Other keys are ignored.
        dtype: build in this dtype. Default: the checkpoint's, bf16/fp16 upcast to float32.
        variant: ``--mm_dense_connector_type``: ``"sti"``, ``"sci"`` or ``"dci"`` (the authors' default
            and the variant of every released script). SCI and DCI weights have the same shapes, so
            the variant cannot be inferred. Default: ``"dci"``
        tower: ``"clip"`` or ``"siglip"``; required, because the released checkpoints are SigLIP while
            the paper's main results are CLIP-L, and the two tap different layers.

    Returns:
        ``FusionProjector(ConcatFuser | TokenConcatFuser, Projector)`` with ``layers`` and ``tokens``.

    Raises:
        ValueError: unknown variant or tower, no ``mm_projector.`` keys, missing/unexpected keys, or an
            input width that does not fit the variant.
    """
    where = "convert_dense_connector"
    check_choice(where, "variant", variant, DENSE_CONNECTOR_VARIANTS)
    if tower is None:
        raise ValueError(
            f"{where}: tower is required ('clip' or 'siglip'): released Dense Connector checkpoints are "
            "SigLIP, the paper's main results CLIP-L/14-336, and the two use different layers"
        )
    check_choice(where, "tower", tower, tuple(DENSE_CONNECTOR_TOWERS))
    plan = preset_plan(f"dense_connector_{variant}", DENSE_CONNECTOR_TOWERS[tower])
    blocks = 1 if variant == "sti" else 3
    return load_projector_behind(plan, state_dict, dtype=dtype, anchor="mm_projector", blocks=blocks, where=where)
