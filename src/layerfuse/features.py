"""The container a tap returns: per-layer tensors plus the facts a fuser needs about them."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

__all__ = ["LayerFeatures"]


class LayerFeatures(list[Tensor]):
    """A ``list`` of per-layer tensors that also carries the patch grid and layer indices.

    It *is* a list, so every API that takes ``Sequence[Tensor]`` accepts it unchanged; fusers that
    need the spatial layout read ``features.grid`` when no explicit ``grid=`` is passed.

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

    def __repr__(self) -> str:
        shapes = ", ".join(str(tuple(t.shape)) for t in self)
        return (
            f"LayerFeatures([{shapes}], grid={self.grid}, layers={self.layers}, "
            f"num_prefix_tokens={self.num_prefix_tokens})"
        )
