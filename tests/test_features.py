import torch

from layerfuse import LayerFeatures


def test_layer_features_is_a_list_with_metadata():
    t = [torch.zeros(2, 6, 4), torch.ones(2, 6, 4)]
    f = LayerFeatures(t, grid=(2, 3), layers=[-2, 5], num_prefix_tokens=0)
    assert isinstance(f, list)
    assert f[1] is t[1]
    assert f.grid == (2, 3)
    assert f.layers == (-2, 5)
    assert "grid=(2, 3)" in repr(f)
    assert "(2, 6, 4)" in repr(f)
