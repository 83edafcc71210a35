"""Multi-scale deformable attention (Deformable DETR's ``MSDeformAttn``), the layer MMFuser is built from."""

# Axis legend: b batch, q queries, s value rows (all levels), m heads, d head dim, l levels,
# p points per head and level, xy the two coordinates of an offset.

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

import torch
from einops import rearrange
from torch import Tensor, nn

from .._checks import check_choice, check_grid, check_module_inputs, check_positive_int, factory_kwargs
from ..ops import ms_deform_attn
from ..ops.msda import backend_names

__all__ = ["MultiScaleDeformableAttention", "direction_grid"]


def direction_grid(heads: int, levels: int, points: int) -> Tensor:
    r"""The authors' initial sampling offsets, in pixels, as a float64 (heads, levels, points, 2) tensor.

    Head ``h`` looks along ``θ_h = 2πh / heads``; its direction ``(cos θ_h, sin θ_h)`` is scaled onto the
    boundary of the unit square (divided by ``max(|cos θ_h|, |sin θ_h|)``), and point ``p`` starts
    ``p + 1`` such steps away, identically on every level. With 16 heads, head 1 points along
    (1, 0.41421) and head 2 along (1, 1).
    """
    theta = torch.arange(heads, dtype=torch.float64) * (2.0 * math.pi / heads)
    unit = torch.stack([theta.cos(), theta.sin()], dim=-1)
    unit = unit / unit.abs().amax(dim=-1, keepdim=True)
    steps = torch.arange(1, points + 1, dtype=torch.float64)
    grid = unit[:, None, None, :] * steps[None, None, :, None]
    return grid.expand(heads, levels, points, 2).contiguous()


class MultiScaleDeformableAttention(nn.Module):
    r"""Each query attends to a few bilinearly sampled points around its reference point on each level.

    For query ``n``, head ``m``, level ``l`` and point ``p``, a linear map of the query gives a pixel
    offset ``(Δx, Δy)`` and an attention logit; the logits are softmax-normalised jointly over the
    ``levels × points`` samples of each head. The sample sits at ``r_n + (Δx / W_l, Δy / H_l)`` in
    normalised coordinates, the value map of level ``l`` is read there bilinearly (zero outside the
    map), and the weighted samples of all heads are concatenated and projected:

    ```text
    V = value_proj(value)                              # (B, S, M, D)
    loc = r + sampling_offsets(query) / (W_l, H_l)    # (B, Nq, M, L, P, 2)
    A = softmax_{L·P}(attention_weights(query))       # (B, Nq, M, L, P)
    out = output_proj(ms_deform_attn(V, spatial_shapes, loc, A))
    ```

    The children and their parameter names are those of Deformable DETR's ``MSDeformAttn`` (and thus
    of MMFuser's checkpoints). Under bf16/fp16 the softmax, the sampling locations and the sampling
    itself run in float32 ([`layerfuse.ops.ms_deform_attn`][layerfuse.ops.ms_deform_attn] accumulates in float32); the linear
    maps run in the module's dtype or under autocast. A ``padding_mask`` zeroes padded value tokens, as
    in Deformable DETR, for batches of images of different sizes padded to one size.

    Args:
        dim: channels C of queries and values; a multiple of ``heads``.
        num_levels: number of value levels L. Default: ``4``
        heads: attention heads M. Default: ``8``
        points: sampling points P per head and level. Default: ``4``
        backend: ``backend=`` of [`layerfuse.ops.ms_deform_attn`][layerfuse.ops.ms_deform_attn]: ``"auto"`` (Triton on CUDA,
            PyTorch elsewhere), ``"pytorch"``, ``"triton"`` or a registered name. Default: ``"auto"``

    Shape:
        - query: (B, Nq, C)
        - reference_points: (Nq, 2) shared by the batch, (B, Nq, 2), or (B, Nq, L, 2) per level;
          normalised (x, y) with (0, 0) the top-left corner of the map
        - value: (B, S, C) with the L levels concatenated on tokens, each row-major,
          S = Σ H_l·W_l
        - spatial_shapes: L pairs (H_l, W_l)
        - output: (B, Nq, C)

    Examples:
        >>> from layerfuse.ops.reference_points import reference_points
        >>> attn = MultiScaleDeformableAttention(64, num_levels=2, heads=4)
        >>> value = torch.randn(2, 6 * 8 + 3 * 4, 64)
        >>> query = torch.randn(2, 6 * 8, 64)
        >>> attn(query, reference_points((6, 8)), value, [(6, 8), (3, 4)]).shape
        torch.Size([2, 48, 64])
    """

    dim: Final[int]
    num_levels: Final[int]
    heads: Final[int]
    points: Final[int]
    backend: Final[str]

    def __init__(
        self,
        dim: int,
        num_levels: int = 4,
        heads: int = 8,
        points: int = 4,
        *,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        where = "MultiScaleDeformableAttention"
        for name, value in (("dim", dim), ("num_levels", num_levels), ("heads", heads), ("points", points)):
            check_positive_int(where, name, value)
        if dim % heads:
            raise ValueError(f"{where}: dim={dim} expected a multiple of heads={heads}")
        check_choice(where, "backend", backend, ("auto", *backend_names()))
        dd = factory_kwargs(where, device, dtype)
        self.dim, self.num_levels, self.heads, self.points, self.backend = dim, num_levels, heads, points, backend
        self.sampling_offsets = nn.Linear(dim, heads * num_levels * points * 2, **dd)
        self.attention_weights = nn.Linear(dim, heads * num_levels * points, **dd)
        self.value_proj = nn.Linear(dim, dim, **dd)
        self.output_proj = nn.Linear(dim, dim, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Zero weights: every query starts by sampling the direction grid around its reference point,
        # with uniform attention 1/(L·P) over the samples, as in Deformable DETR.
        nn.init.zeros_(self.sampling_offsets.weight)
        with torch.no_grad():
            grid = direction_grid(self.heads, self.num_levels, self.points)
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_levels={self.num_levels}, heads={self.heads}, points={self.points}, "
            f"backend={self.backend!r}"
        )

    def _check_inputs(
        self, query: Tensor, reference_points: Tensor, value: Tensor, spatial_shapes: Sequence[Sequence[int]]
    ) -> list[tuple[int, int]]:
        where = f"{type(self).__name__}.forward"
        for name, t in (("query", query), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{where}: {name} expected a torch.Tensor, got {type(t).__name__}")
            if t.ndim != 3 or t.shape[-1] != self.dim:
                raise ValueError(f"{where}: {name} expected shape (B, N, {self.dim}), got {tuple(t.shape)}")
        if value.shape[0] != query.shape[0]:
            raise ValueError(
                f"{where}: value has batch size {value.shape[0]} but query has {query.shape[0]}; "
                f"got query {tuple(query.shape)}, value {tuple(value.shape)}"
            )
        if isinstance(spatial_shapes, Tensor | str | bytes) or not isinstance(spatial_shapes, Sequence):
            raise TypeError(
                f"{where}: spatial_shapes expected a sequence of {self.num_levels} (H, W) int pairs, "
                f"got {type(spatial_shapes).__name__}"
            )
        if len(spatial_shapes) != self.num_levels:
            raise ValueError(
                f"{where}: spatial_shapes expected {self.num_levels} (H, W) pairs (num_levels={self.num_levels}), "
                f"got {list(spatial_shapes)}"
            )
        shapes = [check_grid(where, hw, name=f"spatial_shapes[{i}]") for i, hw in enumerate(spatial_shapes)]
        total = sum(h * w for h, w in shapes)
        if total != value.shape[1]:
            raise ValueError(
                f"{where}: spatial_shapes {shapes} cover {total} value tokens but value has "
                f"{value.shape[1]} (shape {tuple(value.shape)})"
            )
        b, nq = query.shape[0], query.shape[1]
        accepted = [(nq, 2), (b, nq, 2), (b, nq, self.num_levels, 2)]
        if not isinstance(reference_points, Tensor):
            raise TypeError(f"{where}: reference_points expected a torch.Tensor, got {type(reference_points).__name__}")
        if tuple(reference_points.shape) not in accepted:
            raise ValueError(
                f"{where}: reference_points expected shape {' or '.join(str(s) for s in accepted)}, "
                f"got {tuple(reference_points.shape)}"
            )
        if not reference_points.is_floating_point():
            raise TypeError(f"{where}: reference_points expected a floating-point tensor, got {reference_points.dtype}")
        return shapes

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: Sequence[Sequence[int]],
        *,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from ``query`` to bilinear samples of ``value`` around ``reference_points``.

        Args:
            query: (B, Nq, C).
            reference_points: (Nq, 2), (B, Nq, 2) or (B, Nq, L, 2), normalised (x, y).
            value: (B, S, C), the L levels concatenated, each row-major.
            spatial_shapes: L pairs (H_l, W_l).
            padding_mask: (B, S) bool, True at value tokens that are padding (Deformable DETR's
                ``input_padding_mask``): their projected values are set to zero, so a sample reads
                them as it reads the zeros outside the map. Images of different sizes padded to one
                (H_l, W_l) then give exactly their unpadded result when each image's reference points
                are scaled by its valid ratios (w_i / W_l, h_i / H_l), as Deformable DETR's encoder
                does: the offsets, in pixels, are divided by the padded size. Default: ``None``

        Returns:
            (B, Nq, C).

        Raises:
            TypeError: a non-tensor input, or a ``padding_mask`` that is not bool.
            ValueError: shapes that do not fit each other or ``spatial_shapes``.
        """
        where = f"{type(self).__name__}.forward"
        check_module_inputs(
            where, self, query=query, value=value, reference_points=reference_points,
            any_dtype=("reference_points",),
        )
        shapes = self._check_inputs(query, reference_points, value, spatial_shapes)
        if padding_mask is not None:
            if not isinstance(padding_mask, Tensor) or padding_mask.dtype != torch.bool:
                got = padding_mask.dtype if isinstance(padding_mask, Tensor) else type(padding_mask).__name__
                raise TypeError(f"{where}: padding_mask expected a bool tensor (B, S), got {got}")
            if padding_mask.shape != value.shape[:2] or padding_mask.device != value.device:
                raise ValueError(
                    f"{where}: padding_mask expected shape {tuple(value.shape[:2])} (B, S of value) on "
                    f"{value.device}, got {tuple(padding_mask.shape)} on {padding_mask.device}"
                )
        v = self.value_proj(value)
        if padding_mask is not None:
            v = v.masked_fill(padding_mask[..., None], 0.0)
        return self.output_proj(self.sample(query, reference_points, v, shapes))

    def sample(
        self, query: Tensor, reference_points: Tensor, projected_value: Tensor, spatial_shapes: list[tuple[int, int]]
    ) -> Tensor:
        """The attention between the two projections: ``forward`` without ``value_proj`` and ``output_proj``.

        For callers that project values and outputs themselves (e.g. on a packed batch, to skip the
        padding); inputs are not checked.

        Args:
            query: (B, Nq, C).
            reference_points: as in ``forward``.
            projected_value: (B, S, C), ``value_proj`` of the values, zero where padded.
            spatial_shapes: L pairs (H_l, W_l) of python ints.

        Returns:
            (B, Nq, C), the heads' weighted samples, concatenated (before ``output_proj``).
        """
        m, lv, p = self.heads, self.num_levels, self.points
        shapes = spatial_shapes
        v = rearrange(projected_value, "b s (m d) -> b s m d", m=m)
        offsets = rearrange(self.sampling_offsets(query), "b q (m l p xy) -> b q m l p xy", m=m, l=lv, p=p)
        logits = rearrange(self.attention_weights(query), "b q (m lp) -> b q m lp", m=m)

        # float32 under bf16/fp16 (float64 stays float64): the softmax and the sampling positions are
        # the precision-critical steps, and the authors' op only ever saw float32 locations.
        work = torch.promote_types(logits.dtype, torch.float32)
        weights = rearrange(logits.softmax(dim=-1, dtype=work), "b q m (l p) -> b q m l p", l=lv)
        # Offsets are in pixels of each level; (W_l, H_l) turns them into normalised units, x first.
        size = torch.tensor([[w, h] for h, w in shapes], dtype=work, device=query.device)
        if reference_points.ndim == 2:
            ref = reference_points[None, :, None, None, None, :]
        elif reference_points.ndim == 3:
            ref = reference_points[:, :, None, None, None, :]
        else:
            ref = reference_points[:, :, None, :, None, :]
        # The reference points keep their own precision (float32 from reference_points()) and are
        # promoted by the addition, which is what the authors' float64 results were computed with.
        loc = ref + offsets.to(work) / size[:, None, :]

        return ms_deform_attn(v, shapes, loc, weights, backend=self.backend)
