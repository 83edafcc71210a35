"""Token-axis concatenation of a base layer with average-pooled extra layers (Dense Connector STI)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from .._checks import (
    check_choice,
    check_feature_list,
    check_grid,
    check_positive_int,
    check_same_tokens,
    check_widths,
    factory_kwargs,
    resolve_grid,
)
from ..ops.layer_mean import accumulation_dtype
from .base import Fuser
from .packed import PackedLayout, check_packed_call, is_packed

__all__ = ["TokenConcatFuser"]

# b batch, n tokens, c channels, w window, gh/gw patch grid, h/w pooled grid, kh/kw 2-D window

POOL_MODES = ("1d", "2d")


class TokenConcatFuser(Fuser):
    r"""Keep the base layer's tokens and append average-pooled tokens of the extra layers.

    The output is ``concat_tokens[features[0], pool(features[1]), pool(features[2]), ...]``, all of
    one width C, so the LLM sees more visual tokens and the projector keeps its input width.

    - ``pool="1d"`` is Dense Connector STI as coded: non-overlapping windows of ``window``
      consecutive tokens along the flattened (raster-order) token axis; pooled token k is the mean of
      tokens ``k*window .. k*window + window - 1``; an incomplete window at the end is dropped, and
      windows run across raster rows when the grid width is not a multiple of ``window`` (specs §2.2).
      With CLIP-L/336 (24 x 24 grid) and ``window=8`` each window is 8 horizontally adjacent patches,
      576 + 72 + 72 = 720 tokens.
    - ``pool="2d"`` respects the patch grid: non-overlapping ``(kh, kw)`` windows on the (H, W) grid
      (from ``grid=``, the tap's ``features.grid`` or the module default), pooled tokens in raster
      order of the pooled grid; incomplete windows at the bottom/right edges are dropped, as 1-D
      pooling drops its tail.

    Pooling accumulates in float32 under bf16/fp16 (float64 stays float64).

    Args:
        dim: channel width C of every input.
        num_inputs: number of inputs (the base plus the extra layers); at least 2.
        pool: ``"1d"`` or ``"2d"``. Default: ``"1d"``
        window: the pooling window: an int (1-D length, or a square 2-D window) or ``(kh, kw)`` for
            ``pool="2d"``. Default: ``8``
        grid: default (H, W) patch grid for ``pool="2d"`` when the input carries none. Default: ``None``

    Shape:
        - features: ``num_inputs`` tensors (B, N, C)
        - output: (B, N + (num_inputs - 1) * P, C), with P = N // window (1-D) or
          (H // kh) * (W // kw) (2-D)

    Examples:
        >>> sti = TokenConcatFuser(1024, 3)  # Dense Connector STI: [L23, pool8(L7), pool8(L15)]
        >>> sti([torch.randn(2, 576, 1024) for _ in range(3)]).shape
        torch.Size([2, 720, 1024])
        >>> TokenConcatFuser(1024, 3, pool="2d", window=(2, 4))(
        ...     [torch.randn(2, 576, 1024) for _ in range(3)], grid=(24, 24)).shape
        torch.Size([2, 720, 1024])
    """

    dim: int
    pool: str
    window: tuple[int, ...]
    grid: tuple[int, int] | None

    def __init__(
        self,
        dim: int,
        num_inputs: int,
        *,
        pool: str = "1d",
        window: int | Sequence[int] = 8,
        grid: Sequence[int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        where = "TokenConcatFuser"
        self.dim = check_positive_int(where, "dim", dim)
        factory_kwargs(where, device, dtype)  # no parameters, but a wrong device/dtype is still a mistake
        check_positive_int(where, "num_inputs", num_inputs)
        if num_inputs < 2:
            raise ValueError(f"{where}: num_inputs expected at least 2 (a base and an extra layer), got {num_inputs}")
        check_choice(where, "pool", pool, POOL_MODES)
        if pool == "1d":
            if not isinstance(window, int):
                raise TypeError(f"{where}: window expected an int for pool='1d', got {window!r}")
            self.window = (check_positive_int(where, "window", window),)
        else:
            pair = (window, window) if isinstance(window, int) else window
            if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
                raise TypeError(f"{where}: window expected an int or a pair (kh, kw) for pool='2d', got {window!r}")
            self.window = tuple(check_positive_int(where, f"window[{i}]", k) for i, k in enumerate(pair))
        if grid is not None and pool == "1d":
            raise ValueError(f"{where}: grid is only used by pool='2d'; got grid={grid!r} with pool='1d'")
        self.grid = None if grid is None else check_grid(where, grid)
        self.pool = pool
        self.in_dims = (self.dim,) * num_inputs
        self.out_dim = self.dim
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """No parameters; present for the common fuser interface."""

    def num_output_tokens(self, num_tokens: int, grid: Sequence[int] | None = None) -> int:
        """Tokens out for ``num_tokens`` tokens in per layer (and the (H, W) grid for ``pool="2d"``)."""
        if self.pool == "1d":
            pooled = num_tokens // self.window[0]
        else:
            h, w = resolve_grid("TokenConcatFuser.num_output_tokens", num_tokens, grid, None, self.grid)
            pooled = (h // self.window[0]) * (w // self.window[1])
        return num_tokens + (self.num_inputs - 1) * pooled

    def _pool(self, x: Tensor, grid: tuple[int, int] | None) -> Tensor:
        acc = accumulation_dtype(x.dtype)
        if grid is None:
            (w,) = self.window
            n = x.shape[1] // w
            windows = rearrange(x[:, : n * w], "b (n w) c -> b n w c", w=w)
        else:
            kh, kw = self.window
            h, w = grid[0] // kh, grid[1] // kw
            maps = rearrange(x, "b (gh gw) c -> b gh gw c", gh=grid[0], gw=grid[1])
            windows = rearrange(maps[:, : h * kh, : w * kw], "b (h kh) (w kw) c -> b (h w) (kh kw) c", kh=kh, kw=kw)
        return windows.mean(dim=2, dtype=acc).to(x.dtype)

    def forward(
        self,
        features: Sequence[Tensor],
        grid: Sequence[int] | None = None,
        level_grids: Sequence[Sequence[int]] | None = None,
        *,
        text: Tensor | None = None,
    ) -> Tensor:
        """Fuse `features`.

        Args:
            features: `num_inputs` tensors (B, N, C), the base layer first.
                A packed `LayerFeatures` (per layer (sum N_i, C), per-image `grids`) is pooled in one
                pass, windows inside each image, and gives per image its base then pooled tokens.
            grid: (H, W) of the patch tokens: used (and required, unless the features or the module
                carry one) by `pool="2d"`; accepted by `pool="1d"` when it fits the tokens.
            level_grids: accepted when every entry equals the tokens' grid (see [`Fuser`][layerfuse.Fuser]).
            text: refused: this fuser takes no instruction.

        Returns:
            (B, N + (num_inputs - 1) * P, C).
        """
        where = "TokenConcatFuser.forward"
        if is_packed(features):  # images of different sizes: pooling windows stay inside each image
            return self._forward_packed(where, features, grid, level_grids, text)
        checked = self._call_args(where, features, grid, text)
        feats = check_feature_list(where, features, length=self.num_inputs)
        check_widths(where, feats, self.in_dims)
        tokens = check_same_tokens(where, feats)
        self._check_token_layout(where, features, tokens, checked, level_grids)
        hw = None
        if self.pool == "2d":
            hw = resolve_grid(where, tokens, grid, features, self.grid)
            if hw[0] < self.window[0] or hw[1] < self.window[1]:
                raise ValueError(f"{where}: grid {hw} is smaller than the pooling window {self.window}")
        elif tokens < self.window[0]:
            raise ValueError(f"{where}: {tokens} tokens are fewer than the pooling window {self.window[0]}")
        return torch.cat([feats[0], *(self._pool(f, hw) for f in feats[1:])], dim=1)

    def _forward_packed(
        self, where: str, features: Any, grid: object, level_grids: object, text: Tensor | None
    ) -> Tensor:
        """A packed batch in one pass: every image's pooling windows gathered at once.

        Each pooled token is the mean of a window inside its image (2-D windows on the image's grid,
        1-D windows of consecutive tokens from the image's first token), so the output, image after
        image ``[base_i; pool(F_1)_i; ...]``, equals one call per image.
        """
        check_packed_call(where, features, grid, level_grids)
        self._call_args(where, features, None, text)
        layers = list(features)
        for i, t in enumerate(layers):
            if t.ndim != 2 or t.shape[-1] != self.dim:
                raise ValueError(f"{where}: features[{i}] of a packed batch expected shape (sum N_i, {self.dim}), "
                                 f"got {tuple(t.shape)}")
        grids = list(features.grids)
        if not grids:
            return layers[0].new_zeros(0, self.dim)
        for h, w in dict.fromkeys(grids):
            if self.pool == "2d" and (h < self.window[0] or w < self.window[1]):
                raise ValueError(f"{where}: grid {(h, w)} (an image of the packed batch) is smaller than the "
                                 f"pooling window {self.window}")
            if self.pool == "1d" and h * w < self.window[0]:
                raise ValueError(f"{where}: {h * w} tokens (an image of the packed batch with grid {(h, w)}) are "
                                 f"fewer than the pooling window {self.window[0]}")
        layout = PackedLayout(grids, device=layers[0].device)
        n = layout.num_images
        images = torch.arange(n, device=layout.image.device)
        hs, ws = layout.image_heights, layout.image_widths
        if self.pool == "2d":
            kh, kw = self.window
            pooled_w = ws // kw
            sizes = (hs // kh) * pooled_w
        else:
            sizes = layout.image_sizes // self.window[0]
        image = torch.repeat_interleave(images, sizes)
        first = torch.cumsum(sizes, 0) - sizes
        k = torch.arange(image.shape[0], device=image.device) - first[image]
        if self.pool == "2d":
            dy = torch.arange(kh, device=image.device).repeat_interleave(kw)
            dx = torch.arange(kw, device=image.device).repeat(kh)
            rows = (k // pooled_w[image] * kh)[:, None] + dy
            cols = (k % pooled_w[image] * kw)[:, None] + dx
            window = layout.starts[image, None] + rows * ws[image, None] + cols
        else:
            window = (layout.starts[image] + k * self.window[0])[:, None] + torch.arange(
                self.window[0], device=image.device)
        acc = accumulation_dtype(layers[0].dtype)
        pooled = [
            f.index_select(0, window.flatten()).view(*window.shape, self.dim).mean(dim=1, dtype=acc).to(f.dtype)
            for f in layers[1:]
        ]
        # Where each row lands: image i's block starts after the earlier images' tokens and pooled tokens.
        extra = len(pooled)
        out_start = layout.starts + extra * first
        dest = [out_start[layout.image] + layout.local]
        for m in range(extra):
            dest.append(out_start[image] + layout.image_sizes[image] + m * sizes[image] + k)
        rows_in = torch.cat([layers[0], *pooled], dim=0)
        return rows_in.new_empty(rows_in.shape).index_copy_(0, torch.cat(dest), rows_in)

    def get_config(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "num_inputs": self.num_inputs,
            "pool": self.pool,
            "window": self.window[0] if self.pool == "1d" else list(self.window),
            "grid": None if self.grid is None else list(self.grid),
            **self._preset_config(),
        }

    def extra_repr(self) -> str:
        window = self.window[0] if self.pool == "1d" else self.window
        text = f"dim={self.dim}, num_inputs={self.num_inputs}, pool={self.pool!r}, window={window}"
        if self.grid is not None:
            text += f", grid={self.grid}"
        return text
