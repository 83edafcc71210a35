"""Fixed 2-D sine-cosine position encodings in image-relative coordinates."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .._checks import check_float, check_grid, check_positive_int

__all__ = ["sincos_2d"]


def sincos_2d(
    grid: Sequence[int],
    dim: int,
    *,
    temperature: float = 10000.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    r"""2-D sine-cosine position encoding of an (H, W) token grid, shape (H·W, dim), row-major.

    Positions are the token centres in image-relative coordinates, ``y = 2π (i + 0.5) / H`` and
    ``x = 2π (j + 0.5) / W`` (DETR's normalised sine encoding), so grids of different resolution
    over the same image give the same code at the same place. The first ``dim/2`` channels encode
    y, the last ``dim/2`` encode x; each half is ``[sin(p·f_0..f_{F-1}), cos(p·f_0..f_{F-1})]`` with
    ``F = dim/4`` frequencies ``f_k = temperature ** (-k / F)``. Computed in float32, returned in
    ``dtype``.

    Args:
        grid: (H, W).
        dim: channels, a multiple of 4.
        temperature: frequency base. Default: ``10000``

    Examples:
        >>> sincos_2d((24, 32), 256).shape
        torch.Size([768, 256])
    """
    h, w = check_grid("sincos_2d", grid)
    check_positive_int("sincos_2d", "dim", dim)
    temperature = check_float("sincos_2d", "temperature", temperature, low=0.0, low_open=True)
    if dim % 4:
        raise ValueError(f"sincos_2d: dim expected a multiple of 4 (sin and cos of y and x), got {dim}")
    num_freq = dim // 4
    freqs = temperature ** (-torch.arange(num_freq, device=device, dtype=torch.float32) / num_freq)

    def axis(n: int) -> Tensor:
        pos = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) * (2 * math.pi / n)
        angles = pos[:, None] * freqs
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    y, x = axis(h), axis(w)
    code = torch.cat([y[:, None, :].expand(h, w, -1), x[None, :, :].expand(h, w, -1)], dim=-1)
    return code.reshape(h * w, dim).to(dtype or torch.get_default_dtype())
