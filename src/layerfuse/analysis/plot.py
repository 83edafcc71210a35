"""Heat-map picture of a layer-similarity matrix with its bands drawn in."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .._checks import check_choice, check_positive_int, check_string
from .._optional import require
from .grouping import LayerGroups
from .similarity import LayerSimilarity

__all__ = ["SCALES", "plot_similarity"]


SCALES = ("robust", "full", "minmax")

# Percentiles of the off-diagonal values that bound the default colour scale: on random or untrained
# weights every layer pair sits near 1, and a fixed [0, 1] scale paints the whole matrix one colour.
_ROBUST_PERCENTILES = (2.0, 98.0)


def plot_similarity(
    result_or_matrix: LayerSimilarity | Tensor,
    path: str | Path,
    *,
    groups: LayerGroups | None = None,
    title: str | None = None,
    scale: str = "robust",
    dpi: int = 150,
) -> Path:
    """Write the similarity matrix as a heat-map image (PNG, or any format matplotlib infers from ``path``).

    Rows and columns are labelled with the hidden-state indices. The title always names the model,
    the metric and the number of images (from the [`LayerSimilarity`][layerfuse.analysis.LayerSimilarity]);
    ``title`` adds a line above them. With ``groups``, each band is outlined on the diagonal, named
    along the top (shallow / middle / deep for three bands) and its representative layer starred; a
    legend below the matrix says so. The colour bar's label states the colour scale. Drawn with
    matplotlib's Agg canvas, without pyplot, so it needs no display and leaves pyplot's global state
    alone.

    Args:
        result_or_matrix: a [`LayerSimilarity`][layerfuse.analysis.LayerSimilarity] or an (L, L) tensor (labelled 0..L−1).
        path: output file; parent folders are created.
        groups: bands from [`group_layers`][layerfuse.analysis.group_layers]; their layers must be rows of the matrix.
        title: extra title line, drawn above the model / metric / image-count line.
        scale: colour scale. ``"robust"`` (default): colours span the 2nd to 98th percentile of the
            off-diagonal values (values beyond are drawn in the end colours, marked by the colour
            bar's arrows), readable whether the layers are all alike (random weights) or not;
            ``"full"``: from ``min(0, smallest value)`` to 1, comparable across plots;
            ``"minmax"``: the off-diagonal entries min–max scaled to [0, 1] (the diagonal drawn as 1),
            the look of the LRS paper's figure. The stored matrix is never changed.
        dpi: resolution of the written image.

    Returns:
        The path written.

    Raises:
        TypeError: ``result_or_matrix`` is neither a result nor a tensor.
        ValueError: a non-square matrix, an unknown ``scale``, or ``groups`` naming layers that are
            not rows of the matrix.
        ImportError: matplotlib is missing (``analysis`` extra).
    """
    where = "plot_similarity"
    if isinstance(result_or_matrix, LayerSimilarity):
        matrix, layers = result_or_matrix.matrix, result_or_matrix.layers
        model = result_or_matrix.model or "model"
        count = result_or_matrix.num_images
        default_title = (
            f"{model}: {result_or_matrix.metric} similarity between layers, "
            f"{count} image{'s' if count != 1 else ''}"
        )
        metric = result_or_matrix.metric
    elif isinstance(result_or_matrix, Tensor):
        matrix, layers = result_or_matrix, tuple(range(result_or_matrix.shape[0]))
        default_title, metric = "layer similarity (model, metric and images not recorded)", ""
    else:
        raise TypeError(
            f"{where}: result_or_matrix expected a LayerSimilarity or an (L, L) tensor, "
            f"got {type(result_or_matrix).__name__}"
        )
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{where}: expected a square (L, L) matrix, got shape {tuple(matrix.shape)}")
    if not isinstance(path, str | Path):
        raise TypeError(f"{where}: path expected a file path (str or Path), got {type(path).__name__} {path!r}")
    if title is not None:
        check_string(where, "title", title)
    check_choice(where, "scale", scale, SCALES)
    check_positive_int(where, "dpi", dpi)
    if groups is not None and not isinstance(groups, LayerGroups):
        raise TypeError(f"{where}: groups expected the LayerGroups of group_layers, got {type(groups).__name__}")
    if groups is not None:
        missing = [layer for band in groups.bands for layer in band if layer not in layers]
        if missing:
            raise ValueError(f"{where}: groups name layers {missing} that are not rows of the matrix {layers}")

    figure_mod = require("matplotlib.figure", extra="analysis", purpose="plot_similarity")
    agg = require("matplotlib.backends.backend_agg", extra="analysis", purpose="plot_similarity")

    values = matrix.detach().to("cpu", torch.float64)
    values, vmin, vmax, scale_label = _colour_scale(values, scale)
    name = f"{metric} similarity" if metric else "similarity"
    extend = _extend(values, vmin, vmax)

    num_layers = len(layers)
    side = 3.0 + 0.2 * num_layers
    fig = figure_mod.Figure(figsize=(side + 1.2, side + (0.5 if groups else 0.2)), layout="constrained")
    agg.FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(values.numpy(), cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, extend=extend, label=f"{name}\n{scale_label}")
    step = max(1, -(-num_layers // 25))
    ticks = list(range(0, num_layers, step))
    ax.set_xticks(ticks, [str(layers[t]) for t in ticks], fontsize=7)
    ax.set_yticks(ticks, [str(layers[t]) for t in ticks], fontsize=7)
    ax.set_xlabel("layer (hidden-state index)")
    ax.set_ylabel("layer (hidden-state index)")
    # A figure title: constrained layout makes room for it above the band names.
    fig.suptitle(default_title if not title else f"{title}\n{default_title}", fontsize=9)
    if groups is not None:
        limits = ax.get_xlim(), ax.get_ylim()
        _draw_bands(fig, ax, groups, layers)
        ax.set_xlim(limits[0])
        ax.set_ylim(limits[1])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _colour_scale(values: Tensor, scale: str) -> tuple[Tensor, float, float, str]:
    """The values to draw, the colour range and the colour bar's statement of it."""
    eye = torch.eye(values.shape[0], dtype=torch.bool)
    off = values[~eye]
    off = off[torch.isfinite(off)]
    if scale == "minmax":
        return _min_max_off_diagonal(values), 0.0, 1.0, "off-diagonal min-max scaled to [0, 1]"
    if scale == "full" or off.numel() == 0:
        vmin = min(0.0, float(values[torch.isfinite(values)].min())) if torch.isfinite(values).any() else 0.0
        return values, vmin, 1.0, f"scale {vmin:.3g} to 1"
    low_q, high_q = _ROBUST_PERCENTILES
    low = float(torch.quantile(off, low_q / 100))
    high = float(torch.quantile(off, high_q / 100))
    if not high > low:
        # every off-diagonal value equal: a small symmetric range keeps the colour bar meaningful
        pad = max(abs(low), 1.0) * 1e-6
        low, high = low - pad, high + pad
    return values, low, high, f"scale {low:.4g} to {high:.4g} (off-diagonal {low_q:g}-{high_q:g}th percentile)"


def _extend(values: Tensor, vmin: float, vmax: float) -> str:
    below = bool((values < vmin).any())
    above = bool((values > vmax).any())
    return {(True, True): "both", (True, False): "min", (False, True): "max"}.get((below, above), "neither")


def _min_max_off_diagonal(values: Tensor) -> Tensor:
    eye = torch.eye(values.shape[0], dtype=torch.bool)
    off = values[~eye]
    if off.numel() == 0:
        return values.clone()
    low, high = off.min(), off.max()
    scaled = (values - low) / (high - low) if high > low else torch.zeros_like(values)
    return scaled.masked_fill(eye, 1.0)


def _draw_bands(fig: object, ax: object, groups: LayerGroups, layers: tuple[int, ...]) -> None:
    lines = require("matplotlib.lines", extra="analysis", purpose="plot_similarity")
    effects = require("matplotlib.patheffects", extra="analysis", purpose="plot_similarity")
    # a white outline with a black edge shows on the dark and on the light end of the colour map
    outline = {"color": "white", "lw": 1.5, "path_effects": [effects.withStroke(linewidth=3, foreground="black")]}
    star = {"marker": "*", "color": "red", "markeredgecolor": "black", "markeredgewidth": 0.6, "markersize": 9,
            "linestyle": "none"}
    for name, band, rep in zip(groups.names, groups.bands, groups.representatives):
        start, stop = layers.index(band[0]) - 0.5, layers.index(band[-1]) + 0.5
        ax.plot([start, stop, stop, start, start], [start, start, stop, stop, start], **outline)
        ax.text((start + stop) / 2, 1.01, name, ha="center", va="bottom", fontsize=8,
                transform=ax.get_xaxis_transform())
        r = layers.index(rep)
        ax.plot([r], [r], **star)
    handles = [lines.Line2D([], [], **outline), lines.Line2D([], [], **star)]
    labels = [f"band of mutually similar layers ({len(groups.bands)}, named above)",
              "representative layer of its band"]
    fig.legend(handles, labels, loc="outside lower center", ncol=1, fontsize=7, frameon=False)
