import itertools

import pytest
import torch

from layerfuse.analysis import LayerSimilarity, group_layers


def planted(edges, *, high=0.8, low=0.2, noise=0.05, seed=0):
    """A symmetric matrix with bright blocks on the bands [edges[i], edges[i+1])."""
    size = edges[-1]
    generator = torch.Generator().manual_seed(seed)
    s = torch.full((size, size), low, dtype=torch.float64)
    for a, b in itertools.pairwise(edges):
        s[a:b, a:b] = high
    s += noise * torch.rand(size, size, generator=generator, dtype=torch.float64)
    s = (s + s.T) / 2
    return s.fill_diagonal_(1.0)


def brute_force_score(s, edges):
    band = torch.zeros(s.shape[0], dtype=torch.long)
    for i, (a, b) in enumerate(itertools.pairwise(edges)):
        band[a:b] = i
    within, between = [], []
    for i in range(s.shape[0]):
        for j in range(s.shape[0]):
            if i != j:
                (within if band[i] == band[j] else between).append(s[i, j].item())
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return mean(within) - mean(between)


def test_recovers_planted_lrs_bands():
    s = planted((0, 1, 13, 21, 25))  # embedding + the paper's CLIP-L bands 1-12, 13-20, 21-24
    result = LayerSimilarity(s, tuple(range(25)), "cosine", 100)
    groups = group_layers(result.subset(range(1, 25)), k=3)
    assert groups.bands == (tuple(range(1, 13)), tuple(range(13, 21)), tuple(range(21, 25)))
    assert groups.boundaries == (12, 20)
    assert groups.names == ("shallow", "middle", "deep")
    assert groups.within > 0.8 > 0.25 > groups.between
    assert groups.score == pytest.approx(groups.within - groups.between)


def test_plain_tensor_bands_use_row_indices():
    groups = group_layers(planted((0, 3, 5, 9)), k=3)
    assert groups.bands == ((0, 1, 2), (3, 4), (5, 6, 7, 8))


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_exhaustive_search_is_optimal_and_contiguous(k):
    s = torch.rand(7, 7, dtype=torch.float64)
    s = (s + s.T) / 2
    groups = group_layers(s, k=k)
    assert tuple(itertools.chain(*groups.bands)) == tuple(range(7))
    assert len(groups.bands) == k
    assert all(groups.bands)
    scores = [brute_force_score(s, (0, *cuts, 7)) for cuts in itertools.combinations(range(1, 7), k - 1)]
    assert groups.score == pytest.approx(max(scores), abs=1e-12)
    edges = (0, *(b[-1] + 1 for b in groups.bands))
    assert brute_force_score(s, edges) == pytest.approx(groups.score, abs=1e-12)


def test_representative_is_most_similar_to_its_band():
    s = planted((0, 4, 8, 12), noise=0.0)
    s[5, 4:8] = s[4:8, 5] = 0.95
    s[5, 5] = 1.0
    groups = group_layers(s, k=3)
    assert groups.representatives == (0, 5, 8)  # ties go to the shallowest layer


def test_one_layer_bands():
    groups = group_layers(torch.eye(3, dtype=torch.float64), k=3)
    assert groups.bands == ((0,), (1,), (2,))
    assert groups.representatives == (0, 1, 2)
    assert groups.within == 0.0
    assert groups.to_dict()["boundaries"] == [0, 1]


def test_errors():
    with pytest.raises(ValueError, match=r"group_layers: k=4 bands need at least 4 layers, got 3"):
        group_layers(torch.eye(3), k=4)
    with pytest.raises(ValueError, match=r"group_layers: k expected a positive int, got 0"):
        group_layers(torch.eye(3), k=0)
    with pytest.raises(ValueError, match=r"group_layers: similarity expected a square floating-point \(L, L\) matrix, got shape \(3, 2\)"):
        group_layers(torch.ones(3, 2))
    nan = torch.eye(3)
    nan[0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"group_layers: similarity contains NaN"):
        group_layers(nan)
    with pytest.raises(TypeError, match=r"group_layers: similarity expected a LayerSimilarity or an \(L, L\) tensor, got list"):
        group_layers([[1.0]])
    with pytest.raises(ValueError, match=r"boundary sets to search"):
        group_layers(torch.eye(60), k=8)
