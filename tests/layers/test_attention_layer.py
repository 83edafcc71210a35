"""layers.Attention (projections around the attention op) and layers.sincos_2d."""

from __future__ import annotations

import math

import pytest
import torch
from einops import rearrange

from layerfuse.layers import Attention, sincos_2d
from layerfuse.ops.attention import attention, window_mask


def test_cross_and_self_attention_match_the_written_out_projections():
    layer = Attention(16, heads=4, context_dim=12, dtype=torch.float64)
    x, ctx = torch.randn(2, 6, 16, dtype=torch.float64), torch.randn(2, 9, 12, dtype=torch.float64)
    q = rearrange(layer.to_q(x), "b n (h d) -> b h n d", h=4)
    k, v = rearrange(layer.to_kv(ctx), "b m (two h d) -> two b h m d", two=2, h=4)
    expected = layer.to_out(rearrange(attention(q, k, v, backend="eager"), "b h n d -> b n (h d)"))
    torch.testing.assert_close(layer(x, ctx), expected)
    self_layer = Attention(16, heads=4, dtype=torch.float64)
    assert self_layer(x).shape == (2, 6, 16)


def test_windowed_layer_equals_masked_full_attention():
    layer = Attention(8, heads=2, dtype=torch.float64)
    x, ctx = torch.randn(1, 12, 8, dtype=torch.float64), torch.randn(1, 12 + 24, 8, dtype=torch.float64)
    grids = [(3, 4), (4, 6)]
    out = layer(x, ctx, window=2, query_grid=(3, 4), context_grids=grids)
    q = rearrange(layer.to_q(x), "b n (h d) -> b h n d", h=2)
    k, v = rearrange(layer.to_kv(ctx), "b m (two h d) -> two b h m d", two=2, h=2)
    full = attention(q, k, v, mask=window_mask((3, 4), grids, 2))
    torch.testing.assert_close(out, layer.to_out(rearrange(full, "b h n d -> b n (h d)")))


def test_leaf_names_and_repr():
    layer = Attention(16, heads=4)
    assert [n for n, _ in layer.named_children()] == ["to_q", "to_kv", "to_out"]
    assert "heads=4" in repr(layer)
    assert "backend='auto'" in repr(layer)


def test_reset_parameters_is_repeatable_and_zero_biases():
    layer = Attention(8, heads=2)
    layer.reset_parameters()
    assert torch.equal(layer.to_q.bias, torch.zeros(8))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dim": 10, "heads": 4}, "heads=4 must divide dim=10"),
        ({"dim": 8, "heads": 2, "attn_drop": 1.0}, r"attn_drop expected a float in \[0, 1\)"),
        ({"dim": 8, "heads": 2, "backend": "flash"}, "backend expected one of 'auto', "),
    ],
)
def test_constructor_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Attention(**kwargs)


def test_window_without_grid_raises():
    with pytest.raises(ValueError, match=r"window needs query_grid=\(H, W\)"):
        Attention(8, heads=2)(torch.randn(1, 4, 8), window=1)


def test_sincos_layout_and_resolution_independence():
    code = sincos_2d((3, 5), 8, dtype=torch.float64)
    assert code.shape == (15, 8)
    y = 2 * math.pi * (1 + 0.5) / 3  # row 1
    x = 2 * math.pi * (4 + 0.5) / 5  # column 4
    freqs = torch.tensor([1.0, 10000 ** -0.5], dtype=torch.float64)
    expected = torch.cat([torch.sin(y * freqs), torch.cos(y * freqs), torch.sin(x * freqs), torch.cos(x * freqs)])
    torch.testing.assert_close(code[1 * 5 + 4], expected, atol=1e-6, rtol=0)  # computed in float32
    # token (1, 1) of a 3x3 grid and token (4, 4) of a 9x9 grid share a centre, hence a code
    torch.testing.assert_close(sincos_2d((3, 3), 16)[4], sincos_2d((9, 9), 16)[4 * 9 + 4])
    assert sincos_2d((2, 2), 8, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_sincos_errors():
    with pytest.raises(ValueError, match="dim expected a multiple of 4"):
        sincos_2d((2, 2), 6)
    with pytest.raises(TypeError, match=r"grid expected a pair of ints \(H, W\)"):
        sincos_2d(4, 8)
