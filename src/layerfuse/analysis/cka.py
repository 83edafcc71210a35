"""Linear CKA between layers, streamed over images with per-pair cross-covariance sums."""

from __future__ import annotations

import torch
from torch import Tensor

from .accumulator import SimilarityAccumulator

__all__ = ["LinearCKA"]

# Below this ratio of variance to mean square norm a layer is constant up to float64 rounding.
_FLAT = 1e-12


class LinearCKA(SimilarityAccumulator):
    r"""Linear centred kernel alignment (Kornblith et al., 2019) with every (image, token) pair a sample.

    With X_i (M, C_i) the tokens of layer i over all M = images × tokens samples, centred over the
    samples, and Σ_ij = X_iᵀ X_j:

        CKA(i, j) = ‖Σ_ij‖_F² / (‖Σ_ii‖_F · ‖Σ_jj‖_F)

    This is the feature-space form of the HSIC ratio tr(K_i K_j) / sqrt(tr(K_i K_i) tr(K_j K_j)) with
    linear kernels K = X Xᵀ; it never builds an M × M Gram matrix, so it streams: each update adds
    x_iᵀ x_j to a running C_i × C_j sum for every pair i ≤ j, plus per-layer sums of x for the
    centring, Σ_ij = Σ x_i x_jᵀ − (Σ x_i)(Σ x_j)ᵀ / M. To keep that subtraction accurate when features
    have large means (ViTs have channels of magnitude 100+), every layer is first shifted by its mean
    over the first batch, which leaves the covariance unchanged.

    Memory: the sums take L(L+1)/2 · C² float64 values, independent of the number of images: 430 MiB
    for the 13 hidden states of ViT-B (C = 768), 2.6 GiB for the 25 of CLIP ViT-L (C = 1024). Pass
    fewer layers to ``layer_similarity`` to cut it quadratically. Compute per update: L(L+1)·M·C²
    multiply-adds in float64.

    The result is invariant to orthogonal transforms and isotropic scaling of each layer's features.
    A layer whose features do not vary over the samples has no defined CKA and raises at ``compute``.

    Args:
        device: where the running sums live. Default: the device of the first batch.

    Shape:
        - features: L tensors (B, N, C_l); output of ``compute()``: (L, L) float64 in [0, 1].

    Examples:
        >>> acc = LinearCKA()
        >>> acc.update([torch.randn(2, 16, 8) for _ in range(4)])
        >>> acc.compute().shape
        torch.Size([4, 4])
    """

    name = "cka"

    def _check_layout(self, where: str, layout: tuple[tuple[int, int], ...]) -> None:
        tokens = [n for n, _ in layout]
        if len(set(tokens)) != 1:
            raise ValueError(
                f"{where}: CKA pairs the tokens of one image across layers, so every layer needs the same "
                f"token count N, got {tokens}"
            )

    def _start(self, layout: tuple[tuple[int, int], ...]) -> None:
        dd = {"dtype": torch.float64, "device": self.device}
        widths = [c for _, c in layout]
        self._shift: list[Tensor] | None = None
        self._sum = [torch.zeros(c, **dd) for c in widths]
        self._cross = {
            (i, j): torch.zeros(widths[i], widths[j], **dd)
            for i in range(len(widths))
            for j in range(i, len(widths))
        }
        self._count = 0

    def _add(self, features: list[Tensor]) -> None:
        rows = [f.flatten(0, 1) for f in features]
        if self._shift is None:
            self._shift = [r.to(torch.float64).mean(dim=0) for r in rows]
        num_rows = rows[0].shape[0]
        step = self._rows_per_chunk(len(rows), max(r.shape[1] for r in rows))
        for start in range(0, num_rows, step):
            x = [r[start : start + step].to(torch.float64) - m for r, m in zip(rows, self._shift)]
            for i, xi in enumerate(x):
                self._sum[i] += xi.sum(dim=0)
                for j in range(i, len(x)):
                    self._cross[i, j].addmm_(xi.T, x[j])
        self._count += num_rows

    def _compute(self) -> Tensor:
        num_layers = len(self._sum)
        hsic = torch.zeros(num_layers, num_layers, dtype=torch.float64, device=self.device)
        for (i, j), cross in self._cross.items():
            centred = cross - torch.outer(self._sum[i], self._sum[j]) / self._count
            hsic[i, j] = hsic[j, i] = centred.square().sum()
        flat = [i for i in range(num_layers) if self._relative_variance(i) <= _FLAT]
        if flat:
            raise ValueError(
                f"LinearCKA.compute: layer position(s) {flat} do not vary over the {self._count} samples "
                "seen; CKA is undefined for a constant representation"
            )
        scale = hsic.diagonal().sqrt()
        return (hsic / torch.outer(scale, scale)).fill_diagonal_(1.0)

    def _relative_variance(self, i: int) -> float:
        """Total variance of layer i over its mean square norm (0 for a constant layer)."""
        shift, total, cross = self._shift[i], self._sum[i], self._cross[i, i]
        variance = cross.trace() - total.dot(total) / self._count
        second_moment = cross.trace() + 2 * shift.dot(total) + self._count * shift.dot(shift)
        return float(variance / second_moment) if second_moment > 0 else 0.0
