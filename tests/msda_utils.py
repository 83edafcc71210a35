"""Inputs and the semantic oracle shared by the multi-scale deformable attention tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

# Axis legend: b batch, s value rows, q queries, m heads, d head dim, l levels, p points.


def grid_sample_oracle(value: Tensor, shapes: list[tuple[int, int]], loc: Tensor, attn: Tensor) -> Tensor:
    """The definition: each level sampled with ``grid_sample`` at ``2·loc − 1``, then weighted and summed."""
    b, _, m, _ = value.shape
    out = 0
    for lvl, level in enumerate(value.split([h * w for h, w in shapes], dim=1)):
        h, w = shapes[lvl]
        maps = rearrange(level, "b (h w) m d -> (b m) d h w", h=h, w=w)
        grid = rearrange(2 * loc[:, :, :, lvl] - 1, "b q m p xy -> (b m) q p xy")
        samples = F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        weights = rearrange(attn[:, :, :, lvl], "b q m p -> (b m) 1 q p")
        out = out + (samples * weights).sum(-1)
    return rearrange(out, "(b m) d q -> b q (m d)", b=b, m=m)


def make_inputs(
    shapes: list[tuple[int, int]],
    *,
    batch: int = 2,
    queries: int = 5,
    heads: int = 2,
    head_dim: int = 3,
    points: int = 2,
    dtype: torch.dtype = torch.float64,
    margin: float = 0.3,
    requires_grad: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Random (value, sampling_locations, attention_weights); locations reach ``margin`` beyond [0, 1]."""
    s, levels = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(batch, s, heads, head_dim, dtype=dtype)
    loc = torch.rand(batch, queries, heads, levels, points, 2, dtype=dtype) * (1 + 2 * margin) - margin
    attn = torch.rand(batch, queries, heads, levels, points, dtype=dtype)
    return tuple(t.requires_grad_(requires_grad) for t in (value, loc, attn))


def border_locations(shapes: list[tuple[int, int]], *, batch: int, heads: int, points: int) -> Tensor:
    """Locations exactly on pixel centres, map edges, one pixel outside and far outside.

    Grids must have power-of-two sides so every coordinate is exact in binary and floor() agrees
    between formulations.
    """
    levels = len(shapes)
    queries = []
    for h, w in shapes:
        xs = [-1.0, -0.5 / w, 0.0, 0.5 / w, 0.5, 1.0 - 0.5 / w, 1.0, 1.0 + 0.5 / w, 2.0]
        ys = [-0.5 / h, 0.0, 0.5 / h, 1.0 - 0.5 / h, 1.0, 1.0 + 0.5 / h]
        queries += [(x, y) for x in xs for y in ys]
    pts = torch.tensor(queries, dtype=torch.float64)  # (Nq, 2)
    return pts.view(1, -1, 1, 1, 1, 2).expand(batch, -1, heads, levels, points, 2).contiguous()


def second_derivative_case() -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor]]:
    """The smallest case whose second derivatives a non-differentiable backward gets wrong.

    One 2x2 level holding [1, 2, 3, 5], one query, one head, one point at (0.4, 0.6) with weight
    0.7. For penalty = ||d(out²)/d value||², returns (value, loc, attn) in float64 requiring grad and
    the right (d penalty/d loc, d penalty/d attn) = ((-1.15413, 16.19666), (15.63349,)) to 5
    decimals, from the closed form penalty = 4·out²·a²·Σ_k w_k² (out = a·Σ_k w_k·v_k, w_k the
    bilinear weights) and central differences, which agree.
    """
    value = torch.tensor([1.0, 2.0, 3.0, 5.0], dtype=torch.float64).view(1, 4, 1, 1).requires_grad_()
    loc = torch.tensor([0.4, 0.6], dtype=torch.float64).view(1, 1, 1, 1, 1, 2).requires_grad_()
    attn = torch.tensor([0.7], dtype=torch.float64).view(1, 1, 1, 1, 1).requires_grad_()
    expected = (
        torch.tensor([-1.15413, 16.19666], dtype=torch.float64),
        torch.tensor([15.63349], dtype=torch.float64),
    )
    return value, loc, attn, expected
