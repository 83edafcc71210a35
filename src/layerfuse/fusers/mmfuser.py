"""MMFuser (Cao et al., 2024): a deep ViT layer queries shallower layers through deformable attention."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import torch
from torch import Tensor, nn

from .._checks import check_float, check_positive_int, factory_kwargs
from ..layers.deformable_attention import MultiScaleDeformableAttention
from ..ops.reference_points import reference_points
from .deep_query import DeepQueryFuser
from .packed import PackedLayout, check_packed_call, is_packed

__all__ = ["MMFuser"]


class MMFuser(DeepQueryFuser):
    r"""Deep-query multi-scale deformable fusion, the ``MSCrossAttnBlock`` of MMFuser.

    The query layer Q (in MMFuser, the penultimate ViT block) attends through multi-scale deformable
    cross-attention to the ``num_levels`` other layers (the value levels, shallow to deep), whose
    tokens are concatenated and normalised by one LayerNorm. The result is refined by single-level
    deformable self-attention and added back to the query through two zero-initialised layer-scales:

    ```text
    A1 = cross_attn(query_norm(Q), r, feat_norm([F_0; ...; F_{L-1}]))
    Z = norm1(A1)
    A2 = self_attn(Z, r, Z)
    out = Q + gamma1 * (A1 + gamma2 * A2)
    ```

    where ``r`` are the centres of the query tokens on their (H, W) grid, normalised to [0, 1]², and
    deformable offsets are in pixels of each level. With ``layer_scale_init=0`` (the authors' choice)
    the output equals the query bit for bit at initialisation, so the fuser starts as single-layer
    LLaVA. There is no positional embedding, FFN or dropout, as in the authors' module; parameter names
    (``cross_attn``, ``query_norm``, ``feat_norm``, ``gamma1``, ``norm1``, ``self_attn``, ``gamma2``) are
    theirs, so their checkpoints load by stripping the ``mm_projector.0.`` prefix
    ([`layerfuse.from_official`][layerfuse.from_official] with ``"mmfuser"`` or ``"lin_em"``).

    Unlike the authors' module it takes any number of levels, the query at any position, non-square
    grids and a different grid per value level, any batch size, and any float dtype; it needs no
    compiled extension (the sampling is [`layerfuse.ops.ms_deform_attn`][layerfuse.ops.ms_deform_attn]).

    Args:
        dim: channels C of every input layer (the ViT width) and of the output.
        num_levels: number of value layers L. Default: ``4``
        heads: attention heads of both deformable attentions; must divide ``dim``. Default: ``16``
        points: sampling points per head and level. Default: ``4``
        query_index: position of the query layer in ``features`` (negative counts from the end); the
            other ``num_levels`` entries, in order, are the value levels. Default: ``-1`` (last, as the
            authors order them)
        grid: default (H, W) patch grid, used when ``forward`` gets no ``grid`` and the features carry
            none. Default: ``None``
        eps: epsilon of the three LayerNorms. Default: ``1e-6``
        layer_scale_init: initial value of ``gamma1`` and ``gamma2``. Default: ``0.0``
        backend: sampling backend of [`layerfuse.ops.ms_deform_attn`][layerfuse.ops.ms_deform_attn]. Default: ``"auto"``

    Shape:
        - features: ``num_levels + 1`` tensors (B, N_i, C), patch tokens only (no CLS), row-major on
          their grids; the query has N = H·W tokens
        - output: (B, N, C), the shape of the query

    Examples:
        >>> fuser = MMFuser(1024, num_levels=4, grid=(24, 24))
        >>> feats = [torch.randn(2, 576, 1024) for _ in range(5)]  # layers -22, -17, -12, -7, -2
        >>> out = fuser(feats)
        >>> out.shape, torch.equal(out, feats[-1])  # identity at initialisation
        (torch.Size([2, 576, 1024]), True)
    """

    points: Final[int]
    eps: float
    layer_scale_init: float

    def __init__(
        self,
        dim: int,
        num_levels: int = 4,
        heads: int = 16,
        points: int = 4,
        *,
        query_index: int = -1,
        grid: Sequence[int] | None = None,
        eps: float = 1e-6,
        layer_scale_init: float = 0.0,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        where = "MMFuser"
        self._init_layout(where, dim, num_levels, heads, query_index, grid)
        self.points = check_positive_int(where, "points", points)
        self.eps = check_float(where, "eps", eps, low=0.0, low_open=True)
        self.layer_scale_init = check_float(where, "layer_scale_init", layer_scale_init)
        dd: dict[str, Any] = factory_kwargs(where, device, dtype)

        # Registration order follows the authors' module, so state_dict() lists keys in their order
        # (the layer-scales are plain parameters named gamma1/gamma2 to keep their keys unchanged).
        self.cross_attn = MultiScaleDeformableAttention(dim, num_levels, heads, points, backend=backend, **dd)
        self.query_norm = nn.LayerNorm(dim, eps=eps, **dd)
        self.feat_norm = nn.LayerNorm(dim, eps=eps, **dd)
        self.gamma1 = nn.Parameter(torch.empty(dim, **dd))
        self.norm1 = nn.LayerNorm(dim, eps=eps, **dd)
        self.self_attn = MultiScaleDeformableAttention(dim, 1, heads, points, backend=backend, **dd)
        self.gamma2 = nn.Parameter(torch.empty(dim, **dd))
        self.reset_parameters()

    @property
    def backend(self) -> str:
        return self.cross_attn.backend

    def reset_parameters(self) -> None:
        self.cross_attn.reset_parameters()
        self.self_attn.reset_parameters()
        for norm in (self.query_norm, self.feat_norm, self.norm1):
            norm.reset_parameters()
        nn.init.constant_(self.gamma1, self.layer_scale_init)
        nn.init.constant_(self.gamma2, self.layer_scale_init)

    def get_config(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "num_levels": self.num_levels,
            "heads": self.heads,
            "points": self.points,
            "query_index": self.query_index,
            "grid": None if self.grid is None else list(self.grid),
            "eps": self.eps,
            "layer_scale_init": self.layer_scale_init,
            "backend": self.backend,
        }

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_levels={self.num_levels}, heads={self.heads}, points={self.points}, "
            f"query_index={self.query_index}, grid={self.grid}, eps={self.eps}, "
            f"layer_scale_init={self.layer_scale_init}"
        )

    def forward(
        self,
        features: Sequence[Tensor],
        grid: Sequence[int] | None = None,
        level_grids: Sequence[Sequence[int]] | None = None,
        *,
        text: Tensor | None = None,
    ) -> Tensor:
        """Fuse the value levels into the query layer.

        Args:
            features: ``num_levels + 1`` tensors (B, N_i, C): the value levels in order, with the query
                at ``query_index`` (by default last). A [`LayerFeatures`][layerfuse.LayerFeatures] from
                [`LayerTap`][layerfuse.LayerTap] carries its grid.
                A packed ``LayerFeatures`` (per layer (sum N_i, C), per-image ``grids``) is fused in
                one call (one zero-padded map for the sampling, Deformable DETR's batching) and gives
                (sum N_i, C), equal to one call per image.
            grid: (H, W) of the query tokens, and of every value level unless ``level_grids`` is given.
                Default: ``features.grid``, else the grid the module was built with.
            level_grids: one (H_l, W_l) per value level, in feature order, when the levels have
                different grids (e.g. pooled or other-resolution layers). Default: all equal to ``grid``.
            text: refused (``TypeError``): MMFuser takes no instruction; accepted as ``None`` so every
                fuser shares one calling convention.

        Returns:
            (B, N, C), the fused query tokens.

        Raises:
            ValueError: an explicit ``grid`` that contradicts ``features.grid``, or grids that do not fit
                the token counts.
        """
        where = "MMFuser.forward"
        if is_packed(features):  # images of different sizes: one call, sampling from one padded map
            return self._forward_packed(where, features, grid, level_grids, text)
        self._call_args(where, features, grid, text)
        query, levels, query_grid, shapes = self._split(where, features, grid, level_grids)
        points = reference_points(query_grid, device=query.device)
        value = self.feat_norm(torch.cat(levels, dim=1))
        cross = self.cross_attn(self.query_norm(query), points, value, shapes)
        refined = self.norm1(cross)
        refined = self.self_attn(refined, points, refined, [query_grid])
        return query + self.gamma1 * (cross + self.gamma2 * refined)

    def _forward_packed(
        self, where: str, features: Any, grid: object, level_grids: object, text: Tensor | None
    ) -> Tensor:
        """A packed batch in one call, as Deformable DETR batches images of different sizes.

        Every layer of image i has the image's grid (h_i, w_i). The linear maps and norms are
        token-wise and run on the packed tokens; only the sampling sees a padded batch. Each image's
        projected values go into a zero map of the largest (H, W) (Deformable DETR zeroes its padded
        values the same way), its queries are padded to the largest token count, and its reference
        points are scaled by its valid ratios (w_i / W, h_i / H) while the offsets are divided by the
        padded (W, H). A sample then sits at ``(r + Δ / w_i) · w_i / W`` of the padded map, the same
        pixel as ``r + Δ / w_i`` of the image's own map, and what falls outside the image reads
        zeros in both; so every image gets what a call on it alone gives.
        """
        check_packed_call(where, features, grid, level_grids)
        self._call_args(where, features, None, text)
        layers = list(features)
        for i, t in enumerate(layers):
            if t.ndim != 2 or t.shape[-1] != self.dim:
                raise ValueError(f"{where}: features[{i}] of a packed batch expected shape (sum N_i, {self.dim}), "
                                 f"got {tuple(t.shape)}")
        query = layers[self._query_pos]
        if not features.grids:  # no images: an empty result
            return query.new_zeros(0, self.dim)
        levels = [t for i, t in enumerate(layers) if i != self._query_pos]
        layout = PackedLayout(features.grids, device=query.device)
        size = (layout.height, layout.width)
        work = torch.promote_types(query.dtype, torch.float32)
        # Each image's token centres on its own grid, in float32 exactly as reference_points() gives
        # them, then moved onto the padded map (Deformable DETR's valid ratios).
        own = torch.stack([(layout.col.float() + 0.5) / layout.image_widths[layout.image].float(),
                           (layout.row.float() + 0.5) / layout.image_heights[layout.image].float()], dim=-1)
        ratios = torch.stack([layout.image_widths[layout.image].to(work) / layout.width,
                              layout.image_heights[layout.image].to(work) / layout.height], dim=-1)
        points = layout.pad(own.to(work) * ratios, spatial=False)

        def attend(attn: MultiScaleDeformableAttention, q: Tensor, value: Tensor) -> Tensor:
            # value: (L · sum N_i, C), level after level
            padded = layout.pad_levels(attn.value_proj(value), attn.num_levels, spatial=True)
            sampled = attn.sample(layout.pad(q, spatial=False), points, padded, [size] * attn.num_levels)
            return attn.output_proj(layout.unpad(sampled, spatial=False))

        cross = attend(self.cross_attn, self.query_norm(query), self.feat_norm(torch.cat(levels, dim=0)))
        refined = self.norm1(cross)
        refined = attend(self.self_attn, refined, refined)
        return query + self.gamma1 * (cross + self.gamma2 * refined)
