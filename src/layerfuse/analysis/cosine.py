"""Cosine similarity between layers: token by token, or of the mean-pooled tokens of each image."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .accumulator import SimilarityAccumulator

__all__ = ["PooledCosine", "TokenCosine"]

# Zero vectors have cosine 0 with everything (F.normalize's convention) instead of NaN.
_EPS = 1e-12


class _CosineSums(SimilarityAccumulator):
    """Sum over samples of u_i · u_j for unit vectors u_l, kept as one (L, L) float64 matrix.

    Stacking the L unit vectors of a sample gives U (L, C); summing U Uᵀ over samples is the single
    matrix product of the (L, samples·C) flattening with its transpose, so an update costs one GEMM.
    """

    def _start(self, layout: tuple[tuple[int, int], ...]) -> None:
        self._sum = torch.zeros(len(layout), len(layout), dtype=torch.float64, device=self.device)
        self._count = 0

    def _add_unit_rows(self, rows: list[Tensor]) -> None:
        """Add L tensors (M, C) of matching samples; each row is normalised here."""
        num_rows, width = rows[0].shape
        step = self._rows_per_chunk(len(rows), width)
        for start in range(0, num_rows, step):
            u = torch.stack([r[start : start + step].to(torch.float64) for r in rows])
            u = F.normalize(u, dim=-1, eps=_EPS).flatten(1)
            self._sum.addmm_(u, u.T)
        self._count += num_rows

    def _compute(self) -> Tensor:
        return self._sum / self._count


class TokenCosine(_CosineSums):
    r"""Token-aligned cosine similarity: the mean over images n and token positions t of
    cos(X_i[n, t], X_j[n, t]).

    The default metric of the layer-similarity analysis (the LRS figure's "average cosine similarity"):
    it compares what two layers hold at the same token, so it needs the same token count N and width C
    in every layer.

    Args:
        device: where the running sums live. Default: the device of the first batch.

    Shape:
        - features: L tensors (B, N, C); output of ``compute()``: (L, L) float64.

    Examples:
        >>> acc = TokenCosine()
        >>> acc.update([torch.randn(2, 16, 8) for _ in range(4)])
        >>> acc.compute().shape
        torch.Size([4, 4])
    """

    name = "cosine"

    def _check_layout(self, where: str, layout: tuple[tuple[int, int], ...]) -> None:
        if len(set(layout)) != 1:
            raise ValueError(
                f"{where}: token-aligned cosine needs the same (N, C) in every layer, got {list(layout)}"
            )

    def _add(self, features: list[Tensor]) -> None:
        self._add_unit_rows([f.flatten(0, 1) for f in features])


class PooledCosine(_CosineSums):
    r"""Cosine similarity of mean-pooled tokens: the mean over images n of
    cos(mean_t X_i[n, t], mean_t X_j[n, t]).

    The token mean is taken in float64. Layers may differ in token count but not in width C.

    Args:
        device: where the running sums live. Default: the device of the first batch.

    Shape:
        - features: L tensors (B, N_l, C); output of ``compute()``: (L, L) float64.

    Examples:
        >>> acc = PooledCosine()
        >>> acc.update([torch.randn(2, 16, 8) for _ in range(4)])
        >>> acc.compute().shape
        torch.Size([4, 4])
    """

    name = "pooled_cosine"

    def _check_layout(self, where: str, layout: tuple[tuple[int, int], ...]) -> None:
        widths = [c for _, c in layout]
        if len(set(widths)) != 1:
            raise ValueError(f"{where}: pooled cosine needs the same width C in every layer, got {widths}")

    def _add(self, features: list[Tensor]) -> None:
        self._add_unit_rows([f.to(torch.float64).mean(dim=1) for f in features])
