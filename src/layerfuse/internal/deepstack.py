"""DeepStack (Qwen3-VL): per-level 2x2 patch mergers added after the first decoder layers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from .._checks import check_grid, check_positive_int, factory_kwargs
from ..layers.projector import Projector
from .base import InternalFusion
from .layer_maps import deepstack_layer_map

__all__ = ["DeepStack", "PatchMerger", "window_order"]


def window_order(features: Tensor, grid: Sequence[int], merge_size: int = 2) -> Tensor:
    r"""Reorder raster-order patch tokens so that each ``merge_size`` x ``merge_size`` window is contiguous.

    A [`LayerTap`][layerfuse.LayerTap] returns patches row by row; Qwen2-VL/Qwen3-VL processors emit them
    window by window, which is the order [`PatchMerger`][layerfuse.internal.PatchMerger] expects.

    Args:
        features: (N, h * w, C) raster-order tokens.
        grid: ``(h, w)``, both divisible by ``merge_size``.
        merge_size: window side. Default: 2

    Returns:
        (N, h * w, C), windows in raster order, tokens inside a window in raster order.

    Raises:
        ValueError: the grid does not match the token count or is not divisible by ``merge_size``.

    Examples:
        >>> x = torch.arange(16.0).view(1, 16, 1)
        >>> window_order(x, (4, 4))[0, :8, 0].tolist()
        [0.0, 1.0, 4.0, 5.0, 2.0, 3.0, 6.0, 7.0]
    """
    where = "window_order"
    h, w = check_grid(where, tuple(grid))
    check_positive_int(where, "merge_size", merge_size)
    if features.ndim != 3 or features.shape[1] != h * w or h % merge_size or w % merge_size:
        raise ValueError(
            f"{where}: features expected shape (N, {h} * {w}, C) with both grid sides divisible by {merge_size}, "
            f"got {tuple(features.shape)} and grid {(h, w)}"
        )
    n, _, c = features.shape
    m = merge_size
    x = features.view(n, h // m, m, w // m, m, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h * w, c)


class PatchMerger(nn.Module):
    r"""Qwen3-VL's DeepStack patch merger: every ``merge_size**2`` consecutive tokens are concatenated
    (C -> m²C), then LayerNorm (on m²C, Qwen3-VL's "post-shuffle" norm), Linear, exact GELU, Linear.

    Keys ``norm.*``, ``linear_fc1.*``, ``linear_fc2.*`` match ``Qwen3VLVisionPatchMerger`` so its
    weights load unchanged.

    Args:
        in_dim: ViT width C.
        out_dim: LLM hidden size H.
        merge_size: window side m. Default: 2
        eps: LayerNorm epsilon. Default: 1e-6
        device: where to build the parameters.
        dtype: parameter dtype.

    Shape:
        - input: (T, C) with T divisible by m², window-ordered (see
          [`window_order`][layerfuse.internal.window_order]); output: (T / m², H)

    Examples:
        >>> PatchMerger(16, 32)(torch.randn(64, 16)).shape
        torch.Size([16, 32])
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        merge_size: int = 2,
        eps: float = 1e-6,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        where = "PatchMerger"
        check_positive_int(where, "in_dim", in_dim)
        check_positive_int(where, "out_dim", out_dim)
        check_positive_int(where, "merge_size", merge_size)
        dd: dict[str, Any] = factory_kwargs(where, device, dtype)
        self.in_dim, self.out_dim, self.merge_size = in_dim, out_dim, merge_size
        width = in_dim * merge_size**2
        self.norm = nn.LayerNorm(width, eps=eps, **dd)
        self.linear_fc1 = nn.Linear(width, width, **dd)
        self.linear_fc2 = nn.Linear(width, out_dim, **dd)

    def forward(self, x: Tensor) -> Tensor:
        group = self.merge_size**2
        if x.shape[-1] != self.in_dim or x.shape[-2] % group:
            raise ValueError(
                f"PatchMerger.forward: input expected shape (tokens, {self.in_dim}) with tokens divisible by {group}, "
                f"got {tuple(x.shape)}"
            )
        x = self.norm(x.reshape(-1, group * self.in_dim))
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class DeepStack(InternalFusion):
    r"""DeepStack (Qwen3-VL; Meng et al., "DeepStack", NeurIPS 2024): level i, merged to the LLM width,
    is added to the hidden states at the visual positions **after** decoder layer ``fused_layers[i]``
    (layers 0..K-1 by default), in the prefill only.

    Qwen3-VL taps ViT blocks 8/16/24 (``deepstack_visual_indexes``), merges each with its own 2x2
    [`PatchMerger`][layerfuse.internal.PatchMerger] and adds them after decoder layers 0/1/2; this
    module reproduces ``Qwen3VLTextModel``'s ``_deepstack_process`` exactly. ``projector`` may instead
    be any LLaVA projector kind (``"mlp2x_gelu"``, ...), which keeps one token per patch.

    Args:
        in_dim: ViT width C.
        hidden_size: LLM hidden size H.
        num_levels: K, the number of injected ViT layers. Default: 3
        fused_layers: decoder layer after which each level is added. Default: ``0..K-1``
        projector: ``"patch_merger"`` or a LLaVA projector kind. Default: ``"patch_merger"``
        merge_size: window side of the patch merger. Default: 2
        device: where to build the parameters.
        dtype: parameter dtype.

    Shape:
        - features[i]: (T_in, C), (images, tokens, C) or per-image tensors, window-ordered for the
          merger; T_in = merge_size² x image tokens with ``"patch_merger"``, = image tokens otherwise.

    Raises:
        ValueError: bad sizes, ``fused_layers`` whose length is not ``num_levels``.

    Examples:
        >>> fusion = DeepStack(16, 32)
        >>> fusion.fused_layers
        (0, 1, 2)
    """

    def __init__(
        self,
        in_dim: int,
        hidden_size: int,
        num_levels: int = 3,
        *,
        fused_layers: Sequence[int] | None = None,
        projector: str = "patch_merger",
        merge_size: int = 2,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        where = "DeepStack"
        check_positive_int(where, "num_levels", num_levels)
        layers = deepstack_layer_map(num_levels) if fused_layers is None else fused_layers
        super().__init__(layers, where=where)
        if len(self.fused_layers) != num_levels:
            raise ValueError(
                f"{where}: fused_layers expected {num_levels} entries (num_levels), got {list(self.fused_layers)}"
            )
        check_positive_int(where, "in_dim", in_dim)
        check_positive_int(where, "hidden_size", hidden_size)
        check_positive_int(where, "merge_size", merge_size)
        dd: dict[str, Any] = factory_kwargs(where, device, dtype)
        self.in_dim, self.hidden_size, self.num_levels = in_dim, hidden_size, num_levels
        self.projector_kind, self.merge_size = projector, merge_size
        if projector == "patch_merger":
            mergers: list[nn.Module] = [PatchMerger(in_dim, hidden_size, merge_size=merge_size, **dd) for _ in layers]
        else:
            mergers = [Projector(projector, in_dim, hidden_size, **dd) for _ in layers]
        self.mergers = nn.ModuleList(mergers)

    def get_config(self) -> dict[str, Any]:
        return {
            "in_dim": self.in_dim,
            "hidden_size": self.hidden_size,
            "num_levels": self.num_levels,
            "fused_layers": list(self.fused_layers),
            "projector": self.projector_kind,
            "merge_size": self.merge_size,
        }

    def extra_repr(self) -> str:
        return f"fused_layers={list(self.fused_layers)}"

    def _expected_tokens(self, level: int, image_tokens: int) -> int:
        return image_tokens * self.merge_size**2 if self.projector_kind == "patch_merger" else image_tokens

    def _project(self, level: int, features: Tensor) -> Tensor:
        return self.mergers[level](features)

    def _register(self, level: int, layer: nn.Module) -> list[RemovableHandle]:
        return [self._post_hook(level, layer)]
