"""Fusers on a packed batch (images of different sizes in one sequence) equal one call per image."""

from __future__ import annotations

import pytest
import torch

from layerfuse import LayerFeatures
from layerfuse.fusers import ConcatFuser, CrossAttentionFuser, MMFuser, TokenConcatFuser, WeightedSumFuser

C = 16
# Two images share a grid (fused in one batched call), two have grids of their own.
GRIDS = [(4, 6), (2, 4), (4, 6), (6, 4)]


def _packed(num_layers: int, grids=GRIDS) -> LayerFeatures:
    g = torch.Generator().manual_seed(0)
    total = sum(h * w for h, w in grids)
    layers = [torch.randn(total, C, generator=g, dtype=torch.float64) for _ in range(num_layers)]
    return LayerFeatures(layers, grids=grids, layers=range(num_layers))


def _spatial_fusers():
    torch.manual_seed(0)
    return {
        "mmfuser": MMFuser(C, num_levels=2, heads=2, points=2, layer_scale_init=0.5, dtype=torch.float64),
        "cross-attention-windows": CrossAttentionFuser(C, num_levels=2, heads=2, window=2, self_attn=True,
                                                       layer_scale_init=0.5, dtype=torch.float64),
        "token-concat-2d": TokenConcatFuser(C, 3, pool="2d", window=(2, 2), dtype=torch.float64),
        "token-concat-1d": TokenConcatFuser(C, 3, pool="1d", window=4, dtype=torch.float64),
        "concat": ConcatFuser([C] * 3, norm=True, dtype=torch.float64),
        "weighted-sum": WeightedSumFuser(C, 3, layer_proj=True, dtype=torch.float64),
    }


@pytest.mark.parametrize("name", list(_spatial_fusers()))
def test_packed_batch_equals_one_call_per_image(name):
    fuser = _spatial_fusers()[name].eval()
    features = _packed(3)
    with torch.no_grad():
        packed = fuser(features)
        singles = [fuser(image) for image in features.per_image()]
    expected = torch.cat([s[0] for s in singles], dim=0)
    assert packed.shape == expected.shape
    torch.testing.assert_close(packed, expected, rtol=1e-12, atol=1e-12)
    if name in ("mmfuser", "cross-attention-windows"):  # the fusion did something: not the query itself
        assert not torch.allclose(packed, features[-1])


def test_packed_gradients_equal_per_image_gradients():
    fuser = _spatial_fusers()["mmfuser"]
    features = _packed(3)
    leaves = [f.clone().requires_grad_() for f in features]
    packed = fuser(LayerFeatures(leaves, grids=features.grids))
    packed.square().sum().backward()
    grads = [leaf.grad.clone() for leaf in leaves]
    for leaf in leaves:
        leaf.grad = None
    per_image = LayerFeatures(leaves, grids=features.grids).per_image()
    torch.cat([fuser(image)[0] for image in per_image]).square().sum().backward()
    for a, leaf in zip(grads, leaves, strict=True):
        torch.testing.assert_close(a, leaf.grad, rtol=1e-10, atol=1e-12)


def test_packed_batch_refuses_an_explicit_grid():
    fuser = _spatial_fusers()["mmfuser"]
    with pytest.raises(ValueError, match=r"MMFuser.forward: grid=\(4, 6\) was passed with a packed batch, whose "
                                         r"per-image grids \[\(4, 6\), \(2, 4\), \(4, 6\), \(6, 4\)\] come with"):
        fuser(_packed(3), grid=(4, 6))


def test_packed_layer_features_checks():
    with pytest.raises(ValueError, match=r"LayerFeatures: layer 0 of a packed batch expected shape \(10, C\) for "
                                         r"grids \[\(2, 2\), \(2, 3\)\], got \(9, 8\)"):
        LayerFeatures([torch.randn(9, 8)], grids=[(2, 2), (2, 3)])
    with pytest.raises(ValueError, match=r"a packed batch \(grids=\) has per-image grids and no prefix tokens"):
        LayerFeatures([torch.randn(4, 8)], grids=[(2, 2)], grid=(2, 2))
    with pytest.raises(ValueError, match=r"LayerFeatures.offsets: only a packed batch"):
        LayerFeatures([torch.randn(1, 4, 8)], grid=(2, 2)).offsets


@pytest.mark.parametrize("name", list(_spatial_fusers()))
def test_packed_batch_of_no_images_is_empty(name):
    fuser = _spatial_fusers()[name]
    empty = LayerFeatures([torch.zeros(0, C, dtype=torch.float64)] * 3, grids=[])
    out = fuser(empty)
    assert out.shape == (0, fuser.out_dim)
