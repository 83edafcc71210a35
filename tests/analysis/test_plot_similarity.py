import pytest
import torch

from layerfuse.analysis import LayerSimilarity, group_layers, plot_similarity

image = pytest.importorskip("matplotlib.image")


def result():
    s = torch.rand(6, 6, dtype=torch.float64)
    return LayerSimilarity(((s + s.T) / 2).fill_diagonal_(1.0), tuple(range(6)), "cosine", 4)


def test_writes_png_with_bands(tmp_path):
    res = result()
    groups = group_layers(res.subset(range(1, 6)), k=3)
    path = plot_similarity(res, tmp_path / "nested" / "sim.png", groups=groups, title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(path)
    assert pixels.ndim == 3
    assert pixels.shape[0] > 200
    assert pixels.shape[1] > 200


@pytest.mark.parametrize("scale", ["robust", "full", "minmax"])
def test_matrix_input_and_scales(tmp_path, scale):
    path = plot_similarity(torch.eye(4), tmp_path / "eye.png", scale=scale)
    assert image.imread(path).shape[0] > 100


def near_one(num_layers=8, seed=0):
    """What random or untrained weights give: every layer pair between 0.99 and 1."""
    g = torch.Generator().manual_seed(seed)
    s = 0.99 + 0.01 * torch.rand(num_layers, num_layers, generator=g, dtype=torch.float64)
    return LayerSimilarity(((s + s.T) / 2).fill_diagonal_(1.0), tuple(range(num_layers)), "cosine", 13,
                           "patch", "timm:vit_base_patch16_224")


def area_colours(path):
    """Colours that each fill at least 0.2% of the image: the heat-map cells, not text edges."""
    pixels = torch.from_numpy(image.imread(path)[..., :3].copy()).reshape(-1, 3)
    _, counts = torch.unique((pixels * 255).round().to(torch.int32), dim=0, return_counts=True)
    return int((counts >= 0.002 * len(pixels)).sum())


def test_default_scale_is_readable_on_near_constant_matrix(tmp_path):
    # On [0, 1] every cell of this matrix gets nearly the same yellow; the robust default spreads them.
    robust = area_colours(plot_similarity(near_one(), tmp_path / "robust.png", dpi=60))
    full = area_colours(plot_similarity(near_one(), tmp_path / "full.png", scale="full", dpi=60))
    assert robust >= 3 * full


def svg_text(*args, **kwargs):
    """The texts of the figure: an SVG with text kept as <text> elements, not glyph paths."""
    matplotlib = pytest.importorskip("matplotlib")
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        return plot_similarity(*args, **kwargs).read_text()


def test_title_scale_and_legend_are_stated(tmp_path):
    res = near_one()
    groups = group_layers(res.subset(range(1, 8)), k=3)
    text = svg_text(res, tmp_path / "sim.svg")
    assert "timm:vit_base_patch16_224: cosine similarity between layers, 13 images" in text
    assert "off-diagonal 2-98th percentile" in text
    assert "representative layer" not in text  # no bands, no legend
    text = svg_text(res, tmp_path / "bands.svg", groups=groups, title="my run", scale="full")
    assert "my run" in text
    assert "timm:vit_base_patch16_224: cosine similarity between layers, 13 images" in text
    assert "band of mutually similar layers (3, named above)" in text
    assert "representative layer of its band" in text
    assert "scale 0 to 1" in text


def test_errors(tmp_path):
    res = result()
    outside = group_layers(torch.eye(8, dtype=torch.float64), k=2)
    with pytest.raises(ValueError, match=r"plot_similarity: groups name layers \[6, 7\] that are not rows"):
        plot_similarity(res, tmp_path / "x.png", groups=outside)
    with pytest.raises(TypeError, match=r"plot_similarity: result_or_matrix expected a LayerSimilarity or an \(L, L\) tensor, got list"):
        plot_similarity([[1.0]], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"plot_similarity: expected a square \(L, L\) matrix, got shape \(2, 3\)"):
        plot_similarity(torch.ones(2, 3), tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"plot_similarity: scale expected one of 'robust', 'full', 'minmax', got 'log'"):
        plot_similarity(res, tmp_path / "x.png", scale="log")
