"""The container a tap returns: per-layer tensors plus the facts a fuser needs about them."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from einops import rearrange
from torch import Tensor

__all__ = ["TOKEN_MODES", "LayerFeatures"]

# b batch, n tokens, c channels, gh/gw patch grid

# Which tokens a tap keeps: patches only (LLaVA's default), CLS then patches, or every token.
TOKEN_MODES = ("patch", "cls_patch", "all")


class LayerFeatures(list[Tensor]):
    """A ``list`` of per-layer tensors that also carries the patch grid and layer indices.

    It *is* a list, so every API that takes ``Sequence[Tensor]`` accepts it unchanged; fusers that
    need the spatial layout read ``features.grid``, and an explicit ``grid=`` that contradicts it is an
    error.

    Two forms:

    - a batch of images of one size: each entry is (B, N, C) and ``grid`` is the one (H, W);
    - a packed batch of images of different sizes (from a variable-resolution tower such as
      Qwen2-VL or Pixtral): each entry is (N_1 + ... + N_n, C), image after image, each image's
      tokens in raster order; ``grids`` holds the n per-image (H_i, W_i) (N_i = H_i * W_i) and
      ``grid`` is ``None``. ``offsets`` / ``cu_seqlens()`` give the packing, ``per_image()`` and
      ``split()`` the per-image views, ``maps()`` one (1, C, H_i, W_i) map per image.

    Attributes:
        grid: ``(H, W)`` of the patch tokens of a batch, or ``None`` when unknown or packed.
        grids: the per-image ``(H_i, W_i)`` of a packed batch, or ``None`` for a batch.
        layers: the hidden-state index of each entry, as requested (negatives kept).
        num_prefix_tokens: prefix tokens (CLS, registers) still at the front of each entry.

    Examples:
        >>> packed = LayerFeatures([torch.randn(4 + 6, 8)], grids=[(2, 2), (2, 3)], layers=[1])
        >>> packed.offsets, [tuple(t.shape) for t in packed.split()[0]]
        ((0, 4, 10), [(4, 8), (6, 8)])
        >>> [tuple(m.shape) for m in packed.maps()[0]]
        [(1, 8, 2, 2), (1, 8, 2, 3)]
    """

    grid: tuple[int, int] | None
    grids: tuple[tuple[int, int], ...] | None
    layers: tuple[int, ...]
    num_prefix_tokens: int

    def __init__(
        self,
        tensors: Iterable[Tensor] = (),
        *,
        grid: tuple[int, int] | None = None,
        layers: Iterable[int] = (),
        num_prefix_tokens: int = 0,
        grids: Iterable[tuple[int, int]] | None = None,
    ) -> None:
        super().__init__(tensors)
        self.grid = grid
        self.layers = tuple(layers)
        self.num_prefix_tokens = num_prefix_tokens
        self.grids = None if grids is None else tuple((int(h), int(w)) for h, w in grids)
        if self.grids is not None:
            where = "LayerFeatures"
            if grid is not None or num_prefix_tokens:
                raise ValueError(
                    f"{where}: a packed batch (grids=) has per-image grids and no prefix tokens, got "
                    f"grid={grid} and num_prefix_tokens={num_prefix_tokens}"
                )
            total = self.offsets[-1]
            for i, t in enumerate(self):
                if t.ndim != 2 or t.shape[0] != total:
                    raise ValueError(
                        f"{where}: layer {i} of a packed batch expected shape ({total}, C) for grids "
                        f"{list(self.grids)}, got {tuple(t.shape)}"
                    )

    @property
    def packed(self) -> bool:
        """Whether the entries pack images of different sizes into one (sum N_i, C) sequence."""
        return self.grids is not None

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each image's tokens in a packed entry, then the total: (0, N_1, N_1 + N_2, ...)."""
        if self.grids is None:
            raise ValueError("LayerFeatures.offsets: only a packed batch (grids=) has offsets")
        out = [0]
        for h, w in self.grids:
            out.append(out[-1] + h * w)
        return tuple(out)

    def cu_seqlens(self) -> Tensor:
        """``offsets`` as the int32 tensor varlen attention kernels take, on the entries' device."""
        device = self[0].device if len(self) else None
        return torch.tensor(self.offsets, dtype=torch.int32, device=device)

    def split(self) -> list[tuple[Tensor, ...]]:
        """Per layer, the (N_i, C) view of each image of a packed batch."""
        if self.grids is None:
            raise ValueError("LayerFeatures.split: only a packed batch (grids=) splits into images")
        sizes = [h * w for h, w in self.grids]
        return [torch.split(t, sizes) for t in self]

    def per_image(self) -> list[LayerFeatures]:
        """A packed batch as one ``LayerFeatures`` per image, each (1, N_i, C) per layer with its grid."""
        if self.grids is None:
            raise ValueError("LayerFeatures.per_image: only a packed batch (grids=) splits into images")
        views = self.split()
        return [
            LayerFeatures([v[i].unsqueeze(0) for v in views], grid=g, layers=self.layers)
            for i, g in enumerate(self.grids)
        ]

    def stacked(self) -> Tensor:
        """All layers as one (L, B, N, C) tensor (a copy); every layer must have the same shape."""
        shapes = {tuple(t.shape) for t in self}
        if len(shapes) != 1:
            raise ValueError(f"LayerFeatures.stacked: expected layers of one shape, got shapes {sorted(shapes)}")
        return torch.stack(list(self))

    def maps(self) -> list[Tensor] | list[list[Tensor]]:
        """Each layer as a (B, C, H, W) map over the patch grid (a permuted view of the tokens).

        Needs ``grid`` and patch tokens only (``num_prefix_tokens == 0``, i.e. ``tokens="patch"``).
        For a packed batch, each layer gives a list of one (1, C, H_i, W_i) map per image.
        """
        if self.grids is not None:
            return [
                [rearrange(v, "(gh gw) c -> 1 c gh gw", gh=h, gw=w) for v, (h, w) in zip(views, self.grids, strict=True)]
                for views in self.split()
            ]
        if self.num_prefix_tokens:
            raise ValueError(
                f"LayerFeatures.maps: expected patch tokens only (tokens='patch'), got "
                f"{self.num_prefix_tokens} prefix token(s) in front of the patches"
            )
        if self.grid is None:
            raise ValueError("LayerFeatures.maps: the patch grid is unknown (grid=None); cannot lay tokens out as maps")
        gh, gw = self.grid
        for i, t in enumerate(self):
            if t.ndim != 3 or t.shape[1] != gh * gw:
                raise ValueError(
                    f"LayerFeatures.maps: layer {i} expected shape (B, {gh * gw}, C) for grid {self.grid}, "
                    f"got {tuple(t.shape)}"
                )
        return [rearrange(t, "b (gh gw) c -> b c gh gw", gh=gh, gw=gw) for t in self]

    def __repr__(self) -> str:
        shapes = ", ".join(str(tuple(t.shape)) for t in self)
        where = f"grids={list(self.grids)}" if self.grids is not None else f"grid={self.grid}"
        return f"LayerFeatures([{shapes}], {where}, layers={self.layers}, num_prefix_tokens={self.num_prefix_tokens})"
