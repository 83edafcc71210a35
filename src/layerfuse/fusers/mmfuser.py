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
from .packed import fuse_packed, is_packed

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
        if is_packed(features):  # images of different sizes: one call per distinct grid
            return fuse_packed(where, self.forward, features, out_dim=self.out_dim, per_image=True,
                pass_grid=True, grid=grid, level_grids=level_grids, text=text)
        self._call_args(where, features, grid, text)
        query, levels, query_grid, shapes = self._split(where, features, grid, level_grids)
        points = reference_points(query_grid, device=query.device)
        value = self.feat_norm(torch.cat(levels, dim=1))
        cross = self.cross_attn(self.query_norm(query), points, value, shapes)
        refined = self.norm1(cross)
        refined = self.self_attn(refined, points, refined, [query_grid])
        return query + self.gamma1 * (cross + self.gamma2 * refined)
