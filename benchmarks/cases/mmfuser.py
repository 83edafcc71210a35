"""MMFuser (deformable deep-query fusion) at LLaVA-1.5 scale: 4 value levels of 24x24 + the query.

Three cases: the fuser with its LLaVA projector (``mmfuser``), and the fuser block alone, once as
layerfuse's ``MMFuser`` (``mmfuser_block``) and once as the authors' module (``mmfuser_authors``):
their ``MSCrossAttnBlock`` and Deformable-DETR's ``MSDeformAttn`` with its pure-PyTorch sampling
(one ``grid_sample`` per level), written here with their module structure, dtype casts and tensor
layout, and loaded with the same weights. ``benchmarks/fusers.py`` reports the block's speed-up over
the authors' module.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layerfuse import FusionProjector, MMFuser, Projector

from . import FuserCase, llava_features

# The authors' layers: four value levels, then the penultimate block as the query.
LAYERS = (-22, -17, -12, -7, -2)


def ms_deform_attn_core_pytorch(value, value_spatial_shapes, sampling_locations, attention_weights):
    """Deformable-DETR's pure-PyTorch sampling, as in the authors' repository."""
    n, _, m, d = value.shape
    _, lq, m, lv, p, _ = sampling_locations.shape
    value_list = value.split([h * w for h, w in value_spatial_shapes], dim=1)
    sampling_grids = 2 * sampling_locations - 1
    sampling_value_list = []
    for lid, (h, w) in enumerate(value_spatial_shapes):
        value_l = value_list[lid].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        sampling_grid_l = sampling_grids[:, :, :, lid].transpose(1, 2).flatten(0, 1)
        sampling_value_list.append(
            F.grid_sample(value_l, sampling_grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    attention_weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, lv * p)
    output = (torch.stack(sampling_value_list, dim=-2).flatten(-2) * attention_weights).sum(-1).view(n, m * d, lq)
    return output.transpose(1, 2).contiguous()


class AuthorsMSDeformAttn(nn.Module):
    """Deformable-DETR's ``MSDeformAttn`` forward as MMFuser runs it (float32 casts around the op)."""

    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int) -> None:
        super().__init__()
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes, input_level_start_index):
        n, len_q, _ = query.shape
        n, len_in, _ = input_flatten.shape
        value = self.value_proj(input_flatten).view(n, len_in, self.n_heads, self.d_model // self.n_heads)
        sampling_offsets = self.sampling_offsets(query).view(
            n, len_q, self.n_heads, self.n_levels, self.n_points, 2
        )
        attention_weights = self.attention_weights(query).view(n, len_q, self.n_heads, self.n_levels * self.n_points)
        attention_weights = F.softmax(attention_weights, -1).view(
            n, len_q, self.n_heads, self.n_levels, self.n_points
        )
        offset_normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
        sampling_locations = (
            reference_points[:, :, None, :, None, :]
            + sampling_offsets / offset_normalizer[None, None, None, :, None, :]
        )
        shapes = [(int(h), int(w)) for h, w in input_spatial_shapes.tolist()]
        output = ms_deform_attn_core_pytorch(
            value.float(), shapes, sampling_locations.float(), attention_weights.float()
        )
        return self.output_proj(output.to(self.output_proj.weight.dtype))


class AuthorsMMFuser(nn.Module):
    """The authors' ``MSCrossAttnBlock``: takes the five layers stacked as (5, B, N, C), query last."""

    def __init__(self, d_model: int, n_levels: int = 4, n_heads: int = 16, n_points: int = 4) -> None:
        super().__init__()
        self.cross_attn = AuthorsMSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.query_norm = nn.LayerNorm(d_model, eps=1e-6)
        self.feat_norm = nn.LayerNorm(d_model, eps=1e-6)
        self.gamma1 = nn.Parameter(torch.zeros(d_model))
        self.norm1 = nn.LayerNorm(d_model, eps=1e-6)
        self.self_attn = AuthorsMSDeformAttn(d_model, 1, n_heads, n_points)
        self.gamma2 = nn.Parameter(torch.zeros(d_model))

    @staticmethod
    def get_reference_points(spatial_shapes, device):
        reference_points_list = []
        for h, w in spatial_shapes:
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
                torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
                indexing="ij",
            )
            ref = torch.stack((ref_x.reshape(-1)[None] / w, ref_y.reshape(-1)[None] / h), -1)
            reference_points_list.append(ref)
        return torch.cat(reference_points_list, 1)[:, :, None]  # (1, N, 1, 2)

    def forward(self, srcs: Tensor) -> Tensor:
        query, levels = srcs[-1], srcs[:-1]
        shapes = []
        for level in levels:
            e = int(math.sqrt(level.shape[1]))
            shapes.append((e, e))
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=query.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        src_flatten = torch.cat(list(levels), 1)
        e_q = int(math.sqrt(query.shape[1]))
        reference_points = self.get_reference_points([(e_q, e_q)], query.device)
        attn = self.cross_attn(self.query_norm(query), reference_points, self.feat_norm(src_flatten),
                               spatial_shapes, level_start_index)
        z = self.norm1(attn)
        query_shapes = torch.as_tensor([(e_q, e_q)], dtype=torch.long, device=query.device)
        attn2 = self.self_attn(z, reference_points, z, query_shapes, query_shapes.new_zeros((1,)))
        return query + self.gamma1 * (attn + self.gamma2 * attn2)


class StackedInput(nn.Module):
    """Calls the authors' block on the layers stacked on a new leading axis, as their tower does."""

    def __init__(self, block: AuthorsMMFuser) -> None:
        super().__init__()
        self.block = block

    def forward(self, features: list[Tensor]) -> Tensor:
        return self.block(torch.stack(features))


def _fuser(
    device: torch.device, dtype: torch.dtype, quick: bool, *, square: bool = False
) -> tuple[MMFuser, list[Tensor], dict[str, Any]]:
    """MMFuser and its features; ``square`` trims a non-square quick grid (the authors' module needs e×e)."""
    features, scale = llava_features(len(LAYERS), device=device, dtype=dtype, quick=quick)
    grid = scale["grid"]
    if square and grid[0] != grid[1]:
        side = min(grid)
        grid, features = (side, side), [f[:, : side * side].contiguous() for f in features]
    fuser = MMFuser(scale["dim"], num_levels=len(LAYERS) - 1, heads=4 if quick else 16, points=4, grid=grid,
                    device=device, dtype=dtype)
    return fuser, features, scale


def _trained(fuser: MMFuser) -> MMFuser:
    """Layer-scales and offset weights moved off their zero initialisation, so every branch computes."""
    with torch.no_grad():
        fuser.gamma1.fill_(0.1)
        fuser.gamma2.fill_(0.1)
        for attn in (fuser.cross_attn, fuser.self_attn):
            attn.sampling_offsets.weight.normal_(0.0, 0.01)
            attn.attention_weights.weight.normal_(0.0, 0.01)
    return fuser


def build(device: torch.device, dtype: torch.dtype, quick: bool) -> tuple[nn.Module, list[Tensor], dict[str, Any]]:
    fuser, features, scale = _fuser(device, dtype, quick)
    projector = Projector("mlp2x_gelu", scale["dim"], scale["llm"], device=device, dtype=dtype)
    return FusionProjector(fuser, projector, layers=LAYERS, tokens="patch"), features, {}


def build_block(device: torch.device, dtype: torch.dtype, quick: bool) -> tuple[nn.Module, list[Tensor], dict[str, Any]]:
    fuser, features, _ = _fuser(device, dtype, quick, square=True)
    return _trained(fuser), features, {}


def build_authors(device: torch.device, dtype: torch.dtype, quick: bool) -> tuple[nn.Module, list[Tensor], dict[str, Any]]:
    fuser, features, _ = _fuser(device, dtype, quick, square=True)
    state = _trained(fuser).state_dict()  # before the authors' module draws its own initial weights
    block = AuthorsMMFuser(fuser.dim, fuser.num_levels, fuser.heads, fuser.points).to(device, dtype)
    block.load_state_dict(state)
    return StackedInput(block), features, {}


CASES = [
    FuserCase("mmfuser", build),
    FuserCase("mmfuser_block", build_block),
    FuserCase("mmfuser_authors", build_authors),
]
