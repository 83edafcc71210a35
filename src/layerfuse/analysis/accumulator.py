"""The streaming interface every layer-similarity metric implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from .._checks import check_feature_list

__all__ = ["SimilarityAccumulator"]

# Rows (image-token pairs) converted to float64 at once, per layer; bounds the working set of an
# update to about this many bytes times the number of layers, whatever the batch size.
_CHUNK_ELEMENTS = 2**22


class SimilarityAccumulator(ABC):
    r"""Running sums over images that yield an (L, L) layer-similarity matrix.

    Feed one batch at a time with [`update`][layerfuse.analysis.accumulator.SimilarityAccumulator.update]; [`compute`][layerfuse.analysis.accumulator.SimilarityAccumulator.compute] returns the matrix for every image
    seen so far. Memory does not grow with the number of images, and the result does not depend on
    how the images were split into batches (up to float64 rounding). Every input is converted to
    float64 before it is reduced, so float32, bf16 and fp16 features are summed in float64.

    Args:
        device: where the running sums live. Default: the device of the first batch.

    Shape:
        - features: L tensors (B, N_l, C_l), the same L layers in the same order at every call.
        - output of [`compute`][layerfuse.analysis.accumulator.SimilarityAccumulator.compute]: (L, L), float64, on the CPU.
    """

    name: ClassVar[str]

    def __init__(self, *, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else None
        self.num_images = 0
        self._layout: tuple[tuple[int, int], ...] | None = None

    @property
    def num_layers(self) -> int | None:
        """L, fixed by the first batch (``None`` before it)."""
        return None if self._layout is None else len(self._layout)

    def update(self, features: Sequence[Tensor]) -> None:
        """Add one batch of per-layer features (any floating dtype; no gradients are kept)."""
        where = f"{type(self).__name__}.update"
        feats = check_feature_list(where, features)
        layout = tuple((int(f.shape[1]), int(f.shape[2])) for f in feats)
        if self._layout is None:
            self._check_layout(where, layout)
            if self.device is None:
                self.device = feats[0].device
            self._start(layout)
            self._layout = layout
        elif layout != self._layout:
            raise ValueError(
                f"{where}: every batch must have the same layers; the first batch had (N, C) per layer "
                f"{list(self._layout)}, this one has {list(layout)}"
            )
        self._add([f.detach().to(self.device) for f in feats])
        self.num_images += int(feats[0].shape[0])

    def compute(self) -> Tensor:
        """The (L, L) similarity matrix, float64 on the CPU, exactly symmetric."""
        if self.num_images == 0:
            raise ValueError(f"{type(self).__name__}.compute: no features were added; call update() first")
        s = self._compute()
        return ((s + s.T) / 2).cpu()

    @staticmethod
    def _rows_per_chunk(num_layers: int, width: int) -> int:
        return max(1, _CHUNK_ELEMENTS // (num_layers * width))

    @abstractmethod
    def _check_layout(self, where: str, layout: tuple[tuple[int, int], ...]) -> None:
        """Raise ``ValueError`` if this metric cannot compare layers with these (N, C)."""

    @abstractmethod
    def _start(self, layout: tuple[tuple[int, int], ...]) -> None:
        """Allocate the running sums for L layers with the given (N, C)."""

    @abstractmethod
    def _add(self, features: list[Tensor]) -> None:
        """Add one batch (tensors already on ``self.device``, input dtype)."""

    @abstractmethod
    def _compute(self) -> Tensor:
        """The (L, L) matrix from the sums, float64."""
