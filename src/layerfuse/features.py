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

    Attributes:
        grid: ``(H, W)`` of the patch tokens, or ``None`` when unknown.
        layers: the hidden-state index of each entry, as requested (negatives kept).
        num_prefix_tokens: prefix tokens (CLS, registers) still at the front of each entry.
    """

    grid: tuple[int, int] | None
    layers: tuple[int, ...]
    num_prefix_tokens: int

    def __init__(
        self,
        tensors: Iterable[Tensor] = (),
        *,
        grid: tuple[int, int] | None = None,
        layers: Iterable[int] = (),
        num_prefix_tokens: int = 0,
    ) -> None:
        super().__init__(tensors)
        self.grid = grid
        self.layers = tuple(layers)
        self.num_prefix_tokens = num_prefix_tokens

    def stacked(self) -> Tensor:
        """All layers as one (L, B, N, C) tensor (a copy); every layer must have the same shape."""
        shapes = {tuple(t.shape) for t in self}
        if len(shapes) != 1:
            raise ValueError(f"LayerFeatures.stacked: expected layers of one shape, got shapes {sorted(shapes)}")
        return torch.stack(list(self))

    def maps(self) -> list[Tensor]:
        """Each layer as a (B, C, H, W) map over the patch grid (a permuted view of the tokens).

        Needs ``grid`` and patch tokens only (``num_prefix_tokens == 0``, i.e. ``tokens="patch"``).
        """
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
        return (
            f"LayerFeatures([{shapes}], grid={self.grid}, layers={self.layers}, "
            f"num_prefix_tokens={self.num_prefix_tokens})"
        )
