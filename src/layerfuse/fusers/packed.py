"""Fusing a packed batch: images of different sizes in one (N_1 + ... + N_n, C) sequence per layer.

A variable-resolution tower (Qwen2-VL, Pixtral, SigLIP2 NaFlex, ...) tapped by
[`LayerTap`][layerfuse.LayerTap] gives packed [`LayerFeatures`][layerfuse.LayerFeatures]: per layer
one (sum N_i, C) tensor, image after image in raster order, with the per-image grids in
``features.grids``. Token-wise fusers work on the packed sequence directly. Fusers that look at the
2-D layout (deformable sampling, windows, 2-D pooling) or mix tokens within an image fuse the whole
batch in one call too: `PackedLayout` pads every image to
the largest grid (with a mask of the real tokens) and takes the result back, so each image gives
exactly what one call on that image alone gives.
"""

# n images, t packed tokens (sum of N_i), c channels, s padded tokens per image

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["PackedLayout", "check_packed_call", "fuse_packed", "is_packed"]


def is_packed(features: object) -> bool:
    """Whether ``features`` is a packed batch (a ``LayerFeatures`` with per-image ``grids``)."""
    return getattr(features, "grids", None) is not None


def check_packed_call(where: str, features: Any, grid: object = None, level_grids: object = None) -> None:
    """Refuse an explicit ``grid`` or ``level_grids`` with a packed batch, which carries its own grids.

    Raises:
        ValueError: ``grid`` or ``level_grids`` is not ``None``.
    """
    for name, value in (("grid", grid), ("level_grids", level_grids)):
        if value is not None:
            raise ValueError(
                f"{where}: {name}={value!r} was passed with a packed batch, whose per-image grids "
                f"{list(features.grids)} come with the features (features.grids); drop {name}="
            )


class PackedLayout:
    """Where each token of a packed batch sits: its image, its row and column, and a padded batch.

    Built once per forward from the per-image grids (index arithmetic only, no copies of features).
    Two padded forms exist: ``spatial=True`` puts image i's token (r, c) at r * W + c of an
    (H, W) map, H and W the largest height and width over the images (the layout deformable
    sampling needs: Deformable DETR pads its feature maps the same way); ``spatial=False`` keeps the
    raster order and pads each image to the largest token count (enough for full attention).

    Args:
        grids: the per-image (H_i, W_i).
        device: where to build the index tensors.

    Shape:
        - pad: (sum N_i, ...) -> (n, S, ...) with S = H·W (spatial) or max N_i; padding is zero
        - unpad: (n, S, ...) -> (sum N_i, ...)
        - keep: (n, S) bool, True at real tokens

    Examples:
        >>> layout = PackedLayout([(1, 2), (2, 1)], device="cpu")
        >>> layout.pad(torch.arange(4.0)[:, None], spatial=True)[..., 0]
        tensor([[0., 1., 0., 0.],
                [2., 0., 3., 0.]])
    """

    def __init__(self, grids: Sequence[tuple[int, int]], *, device: torch.device | str | None) -> None:
        self.grids = tuple((int(h), int(w)) for h, w in grids)
        self.num_images = len(self.grids)
        hs = torch.tensor([h for h, _ in self.grids], dtype=torch.long, device=device)
        ws = torch.tensor([w for _, w in self.grids], dtype=torch.long, device=device)
        sizes = hs * ws
        self.sizes = [h * w for h, w in self.grids]
        self.total = sum(self.sizes)
        self.height = max((h for h, _ in self.grids), default=0)
        self.width = max((w for _, w in self.grids), default=0)
        self.max_tokens = max(self.sizes, default=0)
        self.image = torch.repeat_interleave(torch.arange(self.num_images, device=device), sizes)
        starts = torch.cumsum(sizes, 0) - sizes
        local = torch.arange(self.total, device=device) - starts[self.image]
        self.local = local
        self.row = local // ws[self.image]
        self.col = local % ws[self.image]
        self.image_heights, self.image_widths = hs, ws
        self.starts, self.image_sizes = starts, sizes
        self._index = {
            True: self.image * (self.height * self.width) + self.row * self.width + self.col,
            False: self.image * self.max_tokens + local,
        }

    def length(self, *, spatial: bool) -> int:
        """S, the padded tokens per image."""
        return self.height * self.width if spatial else self.max_tokens

    def pad(self, x: Tensor, *, spatial: bool) -> Tensor:
        """(sum N_i, ...) -> (n, S, ...), zeros at the padding."""
        s = self.length(spatial=spatial)
        out = x.new_zeros(self.num_images * s, *x.shape[1:]).index_copy_(0, self._index[spatial], x)
        return out.view(self.num_images, s, *x.shape[1:])

    def pad_levels(self, x: Tensor, num_levels: int, *, spatial: bool) -> Tensor:
        """(L · sum N_i, ...) levels one after another -> (n, L · S, ...), each image's levels padded in turn.

        One copy instead of a padded tensor per level and their concatenation.
        """
        s = self.length(spatial=spatial)
        level = torch.arange(num_levels, device=self.image.device)[:, None]
        index = (self._index[spatial] + self.image * (num_levels - 1) * s)[None, :] + level * s
        out = x.new_zeros(self.num_images * num_levels * s, *x.shape[1:]).index_copy_(0, index.flatten(), x)
        return out.view(self.num_images, num_levels * s, *x.shape[1:])

    def unpad(self, y: Tensor, *, spatial: bool) -> Tensor:
        """(n, S, ...) -> (sum N_i, ...): the real tokens, image after image."""
        return y.flatten(0, 1).index_select(0, self._index[spatial])

    def image_major(self, levels: Sequence[Tensor]) -> Tensor:
        """L packed (sum N_i, ...) levels -> (L · sum N_i, ...) with each image's L levels together.

        Image i's block is its tokens of level 0, then of level 1, ...: the key layout of one call
        on that image, which windowed attention over a packed batch reads image after image.
        """
        num = len(levels)
        image_start = self.starts[self.image] * num + self.local
        dest = image_start[None, :] + torch.arange(num, device=self.image.device)[:, None] * self.image_sizes[self.image]
        stacked = torch.cat(list(levels), dim=0)
        return stacked.new_empty(stacked.shape).index_copy_(0, dest.flatten(), stacked)

    def keep(self, *, spatial: bool) -> Tensor:
        """(n, S) bool, True at real tokens and False at the padding."""
        s = self.length(spatial=spatial)
        mask = torch.zeros(self.num_images * s, dtype=torch.bool, device=self.image.device)
        return mask.index_fill_(0, self._index[spatial], True).view(self.num_images, s)


def fuse_packed(
    where: str,
    forward: Callable[..., Tensor],
    features: Sequence[Tensor],
    *,
    out_dim: int,
    grid: object = None,
    level_grids: object = None,
    **kwargs: Any,
) -> Tensor:
    """Run a token-wise fuser's ``forward`` on a packed batch: the packed sequence as a batch of one.

    Args:
        where: the calling ``forward``, for messages.
        forward: the fuser's forward on a plain list of (B, N, C) tensors.
        features: packed ``LayerFeatures``: per layer (sum N_i, C), per-image ``grids``.
        out_dim: the fuser's output width (of the empty result for a batch of no images).
        grid: must be ``None``: a packed batch carries its grids.
        level_grids: must be ``None``: every layer of an image has the image's grid.
        **kwargs: passed to ``forward`` unchanged.

    Returns:
        (sum N_i, C_out), each image's output tokens, image after image.

    Raises:
        ValueError: an explicit ``grid`` or ``level_grids`` came with a packed batch.
    """
    check_packed_call(where, features, grid, level_grids)
    layers = list(features)
    if not features.grids:  # no images: an empty result of the fuser's width
        return layers[0].new_zeros(0, out_dim)
    return forward([t.unsqueeze(0) for t in layers], **kwargs).squeeze(0)
