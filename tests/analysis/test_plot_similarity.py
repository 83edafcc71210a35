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


def test_matrix_input_and_normalize(tmp_path):
    path = plot_similarity(torch.eye(4), tmp_path / "eye.png", normalize=True)
    assert image.imread(path).shape[0] > 100


def test_errors(tmp_path):
    res = result()
    outside = group_layers(torch.eye(8, dtype=torch.float64), k=2)
    with pytest.raises(ValueError, match=r"plot_similarity: groups name layers \[6, 7\] that are not rows"):
        plot_similarity(res, tmp_path / "x.png", groups=outside)
    with pytest.raises(TypeError, match=r"plot_similarity: result_or_matrix expected a LayerSimilarity or an \(L, L\) tensor, got list"):
        plot_similarity([[1.0]], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"plot_similarity: expected a square \(L, L\) matrix, got shape \(2, 3\)"):
        plot_similarity(torch.ones(2, 3), tmp_path / "x.png")
