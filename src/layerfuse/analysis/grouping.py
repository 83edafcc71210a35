"""Split layers into contiguous bands of mutually similar layers (shallow / middle / deep)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._checks import check_positive_int
from .similarity import LayerSimilarity

__all__ = ["LayerGroups", "group_layers"]

_BAND_NAMES = {2: ("shallow", "deep"), 3: ("shallow", "middle", "deep")}

# Exhaustive search visits comb(L - 1, k - 1) boundary sets; beyond this the call would take minutes.
_MAX_CANDIDATES = 2_000_000


@dataclass(frozen=True)
class LayerGroups:
    """Contiguous bands of layers and one representative layer per band.

    Attributes:
        bands: the layer indices of each band, shallow to deep.
        representatives: per band, the layer with the highest mean similarity to the rest of its band.
        score: the objective at the optimum: ``within - between``.
        within: mean similarity over pairs of distinct layers in the same band.
        between: mean similarity over pairs of layers in different bands.
    """

    bands: tuple[tuple[int, ...], ...]
    representatives: tuple[int, ...]
    score: float
    within: float
    between: float

    @property
    def names(self) -> tuple[str, ...]:
        """Band names: shallow / (middle) / deep for two or three bands, else "band 1", "band 2", ..."""
        return _BAND_NAMES.get(len(self.bands), tuple(f"band {i + 1}" for i in range(len(self.bands))))

    @property
    def boundaries(self) -> tuple[int, ...]:
        """The last layer of every band but the deepest (the paper's CLIP-L bands give (12, 20))."""
        return tuple(band[-1] for band in self.bands[:-1])

    def to_dict(self) -> dict[str, Any]:
        return {
            "bands": [list(b) for b in self.bands],
            "representatives": list(self.representatives),
            "boundaries": list(self.boundaries),
            "score": self.score,
            "within": self.within,
            "between": self.between,
        }


def group_layers(similarity: LayerSimilarity | Tensor, k: int = 3) -> LayerGroups:
    """Split the layers, in the order of the matrix rows, into ``k`` contiguous bands by exhaustive
    search over the band boundaries.

    Objective: maximise the mean similarity over pairs of distinct layers
    that share a band minus the mean similarity over pairs in different bands. Both means pool the
    pairs of all bands, so a band's weight grows with its number of pairs; a partition with no
    within-band pair (every band one layer) scores its within term as 0. Every one of the
    comb(L − 1, k − 1) boundary sets is scored with 2-D prefix sums (O(k) each); ties go to the
    first set in lexicographic order of boundaries.

    The representative of a band is its layer with the highest mean similarity to the other layers
    of the band (the shallowest on ties; a one-layer band represents itself). The LRS paper picks its
    representatives (3, 18, 23 on CLIP ViT-L/14-336) from probing accuracy instead; this rule is ours.

    Args:
        similarity: a [`LayerSimilarity`][layerfuse.analysis.LayerSimilarity] (bands use its hidden-state indices) or an (L, L) tensor
            (bands use 0..L−1). Group only the layers you want banded, e.g.
            ``result.subset(range(1, 25))`` to leave out the embedding output as the paper does.
        k: number of bands, 1 ≤ k ≤ L.

    Returns:
        A [`LayerGroups`][layerfuse.analysis.LayerGroups].
    """
    where = "group_layers"
    check_positive_int(where, "k", k)
    if isinstance(similarity, LayerSimilarity):
        matrix, layers = similarity.matrix, similarity.layers
    elif isinstance(similarity, Tensor):
        matrix, layers = similarity, tuple(range(similarity.shape[0])) if similarity.ndim else ()
    else:
        raise TypeError(
            f"{where}: similarity expected a LayerSimilarity or an (L, L) tensor, got {type(similarity).__name__}"
        )
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or not matrix.is_floating_point():
        raise ValueError(f"{where}: similarity expected a square floating-point (L, L) matrix, got shape {tuple(matrix.shape)}")
    num_layers = matrix.shape[0]
    if k > num_layers:
        raise ValueError(f"{where}: k={k} bands need at least {k} layers, got {num_layers}")
    if not torch.isfinite(matrix).all():
        raise ValueError(f"{where}: similarity contains NaN or infinite values")
    candidates = math.comb(num_layers - 1, k - 1)
    if candidates > _MAX_CANDIDATES:
        raise ValueError(
            f"{where}: k={k} over {num_layers} layers gives {candidates} boundary sets to search, more than "
            f"{_MAX_CANDIDATES}; use fewer bands or fewer layers"
        )

    s = matrix.detach().to("cpu", torch.float64)
    off_diagonal = s - torch.diag(s.diagonal())
    # prefix[a, b] = sum of off_diagonal[:a, :b]; a band [a, b) sums to one 2x2 difference.
    prefix = torch.zeros(num_layers + 1, num_layers + 1, dtype=torch.float64)
    prefix[1:, 1:] = off_diagonal.cumsum(0).cumsum(1)
    prefix_list = prefix.tolist()
    total = prefix_list[num_layers][num_layers]
    total_pairs = num_layers * (num_layers - 1)

    best: tuple[float, float, float, tuple[int, ...]] | None = None
    for cuts in itertools.combinations(range(1, num_layers), k - 1):
        edges = (0, *cuts, num_layers)
        within_sum = within_pairs = 0.0
        for a, b in itertools.pairwise(edges):
            within_sum += prefix_list[b][b] - prefix_list[a][b] - prefix_list[b][a] + prefix_list[a][a]
            within_pairs += (b - a) * (b - a - 1)
        between_pairs = total_pairs - within_pairs
        within = within_sum / within_pairs if within_pairs else 0.0
        between = (total - within_sum) / between_pairs if between_pairs else 0.0
        if best is None or within - between > best[0]:
            best = (within - between, within, between, edges)

    score, within, between, edges = best
    bands, representatives = [], []
    for a, b in itertools.pairwise(edges):
        band_sum = off_diagonal[a:b, a:b].sum(dim=1)
        best_row = int(torch.argmax(band_sum)) if b - a > 1 else 0
        bands.append(tuple(layers[a:b]))
        representatives.append(layers[a + best_row])
    return LayerGroups(tuple(bands), tuple(representatives), score, within, between)
