"""Fusing a packed batch: images of different sizes in one (N_1 + ... + N_n, C) sequence per layer.

A variable-resolution tower (Qwen2-VL, Pixtral, SigLIP2 NaFlex, ...) tapped by
[`LayerTap`][layerfuse.LayerTap] gives packed [`LayerFeatures`][layerfuse.LayerFeatures]: per layer
one (sum N_i, C) tensor, image after image in raster order, with the per-image grids in
``features.grids``. Token-wise fusers work on the packed sequence directly. Fusers that look at the
2-D layout (deformable sampling, windows, 2-D pooling) or mix tokens within an image must see one
image at a time; images that share a grid are fused in one batched call, so the number of calls is
the number of distinct grids, not of images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["fuse_packed", "is_packed"]


def is_packed(features: object) -> bool:
    """Whether ``features`` is a packed batch (a ``LayerFeatures`` with per-image ``grids``)."""
    return getattr(features, "grids", None) is not None


def fuse_packed(
    where: str,
    forward: Callable[..., Tensor],
    features: Sequence[Tensor],
    *,
    out_dim: int,
    per_image: bool,
    pass_grid: bool,
    grid: object = None,
    level_grids: object = None,
    **kwargs: Any,
) -> Tensor:
    """Run a fuser's ``forward`` on a packed batch; the result equals one call per image, concatenated.

    Args:
        where: the calling ``forward``, for messages.
        forward: the fuser's forward on a plain list of (B, N, C) tensors.
        features: packed ``LayerFeatures``: per layer (sum N_i, C), per-image ``grids``.
        out_dim: the fuser's output width (of the empty result for a batch of no images).
        per_image: whether the fuser mixes tokens within an image (then images are fused apart,
            batched by grid); else the packed sequence is fused in one call as a batch of one.
        pass_grid: whether ``forward`` takes the image's grid as ``grid=``.
        grid: must be ``None``: a packed batch carries its grids.
        level_grids: must be ``None``: every layer of an image has the image's grid.
        **kwargs: passed to ``forward`` unchanged.

    Returns:
        (sum M_i, C_out): each image's output tokens (M_i = N_i, or what one call per image gives, e.g.
        N_i plus the pooled tokens of [`TokenConcatFuser`][layerfuse.TokenConcatFuser]), image after
        image.

    Raises:
        ValueError: an explicit ``grid`` or ``level_grids`` came with a packed batch.
    """
    for name, value in (("grid", grid), ("level_grids", level_grids)):
        if value is not None:
            raise ValueError(
                f"{where}: {name}={value!r} was passed with a packed batch, whose per-image grids "
                f"{list(features.grids)} come with the features (features.grids); drop {name}="
            )
    layers = list(features)
    if not features.grids:  # no images: an empty result of the fuser's width
        return layers[0].new_zeros(0, out_dim)
    if not per_image:
        return forward([t.unsqueeze(0) for t in layers], **kwargs).squeeze(0)
    views = features.split()
    by_grid: dict[tuple[int, int], list[int]] = {}
    for i, g in enumerate(features.grids):
        by_grid.setdefault(g, []).append(i)
    outputs: list[Tensor | None] = [None] * len(features.grids)
    for g, images in by_grid.items():
        batch = [torch.stack([layer_views[i] for i in images]) for layer_views in views]
        fused = forward(batch, grid=g, **kwargs) if pass_grid else forward(batch, **kwargs)
        for row, i in enumerate(images):
            outputs[i] = fused[row]
    return torch.cat(outputs, dim=0)  # type: ignore[arg-type]
