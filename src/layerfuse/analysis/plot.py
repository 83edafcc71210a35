"""Heat-map picture of a layer-similarity matrix with its bands drawn in."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .._optional import require
from .grouping import LayerGroups
from .similarity import LayerSimilarity

__all__ = ["plot_similarity"]


def plot_similarity(
    result_or_matrix: LayerSimilarity | Tensor,
    path: str | Path,
    *,
    groups: LayerGroups | None = None,
    title: str | None = None,
    normalize: bool = False,
    dpi: int = 150,
) -> Path:
    """Write the similarity matrix as a heat-map image (PNG, or any format matplotlib infers from ``path``).

    Rows and columns are labelled with the hidden-state indices. With ``groups``, each band is outlined
    on the diagonal, named along the top (shallow / middle / deep for three bands) and its
    representative layer marked. Drawn with matplotlib's Agg canvas, without pyplot, so it needs no
    display and leaves pyplot's global state alone.

    Args:
        result_or_matrix: a [`LayerSimilarity`][layerfuse.analysis.LayerSimilarity] or an (L, L) tensor (labelled 0..L−1).
        path: output file; parent folders are created.
        groups: bands from [`group_layers`][layerfuse.analysis.group_layers]; their layers must be rows of the matrix.
        title: figure title. Default: the metric and image count.
        normalize: min–max scale the off-diagonal entries to [0, 1] for display (the diagonal is drawn
            as 1). The LRS paper's figure looks scaled this way; the stored matrix is never rescaled.
        dpi: resolution of the written image.

    Returns:
        The path written.
    """
    where = "plot_similarity"
    if isinstance(result_or_matrix, LayerSimilarity):
        matrix, layers = result_or_matrix.matrix, result_or_matrix.layers
        default_title = (
            f"{result_or_matrix.metric} similarity between layers ({result_or_matrix.num_images} images)"
        )
    elif isinstance(result_or_matrix, Tensor):
        matrix, layers, default_title = result_or_matrix, tuple(range(result_or_matrix.shape[0])), "layer similarity"
    else:
        raise TypeError(
            f"{where}: result_or_matrix expected a LayerSimilarity or an (L, L) tensor, "
            f"got {type(result_or_matrix).__name__}"
        )
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{where}: expected a square (L, L) matrix, got shape {tuple(matrix.shape)}")
    if groups is not None:
        missing = [layer for band in groups.bands for layer in band if layer not in layers]
        if missing:
            raise ValueError(f"{where}: groups name layers {missing} that are not rows of the matrix {layers}")

    figure_mod = require("matplotlib.figure", extra="analysis", purpose="plot_similarity")
    agg = require("matplotlib.backends.backend_agg", extra="analysis", purpose="plot_similarity")

    values = matrix.detach().to("cpu", torch.float64)
    vmin, vmax = min(0.0, float(values.min())), 1.0
    if normalize:
        values = _min_max_off_diagonal(values)
        vmin = 0.0

    num_layers = len(layers)
    side = 3.0 + 0.2 * num_layers
    fig = figure_mod.Figure(figsize=(side + 1.2, side), layout="constrained")
    agg.FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(values.numpy(), cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="min-max scaled similarity" if normalize else "similarity")
    step = max(1, -(-num_layers // 25))
    ticks = list(range(0, num_layers, step))
    ax.set_xticks(ticks, [str(layers[t]) for t in ticks], fontsize=7)
    ax.set_yticks(ticks, [str(layers[t]) for t in ticks], fontsize=7)
    ax.set_xlabel("layer (hidden-state index)")
    ax.set_ylabel("layer (hidden-state index)")
    # Band names sit just above the matrix; the title is padded to clear them.
    ax.set_title(title if title is not None else default_title, fontsize=10, pad=16 if groups else 6)
    if groups is not None:
        limits = ax.get_xlim(), ax.get_ylim()
        _draw_bands(ax, groups, layers)
        ax.set_xlim(limits[0])
        ax.set_ylim(limits[1])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _min_max_off_diagonal(values: Tensor) -> Tensor:
    eye = torch.eye(values.shape[0], dtype=torch.bool)
    off = values[~eye]
    if off.numel() == 0:
        return values.clone()
    low, high = off.min(), off.max()
    scaled = (values - low) / (high - low) if high > low else torch.zeros_like(values)
    return scaled.masked_fill(eye, 1.0)


def _draw_bands(ax: object, groups: LayerGroups, layers: tuple[int, ...]) -> None:
    for name, band, rep in zip(groups.names, groups.bands, groups.representatives):
        start, stop = layers.index(band[0]) - 0.5, layers.index(band[-1]) + 0.5
        ax.plot([start, stop, stop, start, start], [start, start, stop, stop, start], color="white", lw=1.5)
        ax.text((start + stop) / 2, 1.01, name, ha="center", va="bottom", fontsize=8,
                transform=ax.get_xaxis_transform())
        r = layers.index(rep)
        ax.plot([r], [r], marker="*", color="red", markersize=8, linestyle="none")
