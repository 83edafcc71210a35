"""Normalised patch-centre coordinates: where each query token sits on its feature map."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._checks import check_device, check_grid

__all__ = ["reference_points"]


def reference_points(grid: Sequence[int], *, device: torch.device | str | None = None) -> Tensor:
    r"""The centre of every token of an (H, W) patch grid, normalised to [0, 1]², in row-major order.

    Token ``t = i·W + j`` (row ``i``, column ``j``) gets ``((j + 0.5) / W, (i + 0.5) / H)``, x first, so
    (0, 0) is the top-left corner of the map and (1, 1) the bottom-right; this is the
    ``align_corners=False`` convention of [`layerfuse.ops.ms_deform_attn`][layerfuse.ops.ms_deform_attn]. Because the coordinates
    are normalised, one set of points addresses the same relative position on feature maps of any
    size, so queries on one grid can sample levels with other grids.

    The result is always float32: the authors' MMFuser and Deformable DETR compute these points in
    float32 and let type promotion carry them into float64 arithmetic, and reproducing their float64
    outputs to 1e-10 needs exactly those rounded values (a float64 computation moves the outputs by
    about 3e-8). Callers add offsets in their own precision and promotion does the rest.

    Args:
        grid: ``(H, W)`` of the query tokens; non-square grids are fine.
        device: where to create the tensor. Default: the current default device.

    Returns:
        A float32 tensor of shape (H·W, 2).

    Examples:
        >>> reference_points((2, 3))[:4]
        tensor([[0.1667, 0.2500],
                [0.5000, 0.2500],
                [0.8333, 0.2500],
                [0.1667, 0.7500]])
    """
    h, w = check_grid("reference_points", grid)
    if device is not None:
        device = check_device("reference_points", "device", device)
    y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    return torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1).reshape(h * w, 2)
