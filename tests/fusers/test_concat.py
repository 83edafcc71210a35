import pytest
import torch
from torch import nn

from layerfuse import ConcatFuser
from layerfuse.presets import preset_plan


def _feats(n, b=2, t=5, c=4, dtype=torch.float32):
    return [torch.randn(b, t, c, dtype=dtype) for _ in range(n)]


def test_concat_then_linear_equals_sum_of_split_linears():
    # specs §0.7: Lin([P3; P18; P23]) = W_a P3 + W_b P18 + W_c P23 + bias
    feats = _feats(3, c=8, dtype=torch.float64)
    fuser = ConcatFuser([8, 8, 8])
    linear = nn.Linear(24, 6, dtype=torch.float64)
    blocks = linear.weight.split(8, dim=1)
    summed = sum(f @ w.T for f, w in zip(feats, blocks)) + linear.bias
    torch.testing.assert_close(linear(fuser(feats)), summed, rtol=1e-12, atol=1e-12)


def test_terms_reorder_average_and_share_inputs():
    feats = _feats(4, dtype=torch.float64)
    fuser = ConcatFuser([4] * 4, terms=[3, [0, 1], [1, 2, 3]])
    expected = torch.cat([feats[3], (feats[0] + feats[1]) / 2, (feats[1] + feats[2] + feats[3]) / 3], dim=-1)
    torch.testing.assert_close(fuser(feats), expected, rtol=1e-14, atol=1e-14)
    assert fuser.out_dim == 12
    assert fuser.in_dims == (4, 4, 4, 4)


def test_mixed_widths():
    fuser = ConcatFuser([4, 6, 6], terms=[[1, 2], 0])
    out = fuser([torch.randn(1, 3, 4), torch.randn(1, 3, 6), torch.randn(1, 3, 6)])
    assert out.shape == (1, 3, 10)
    assert fuser.out_dim == 10


def test_dci_index_ranges_as_coded():
    plan = preset_plan("dense_connector_dci", 24)
    hidden = [torch.full((1, 2, 1), float(k), dtype=torch.float64) for k in range(25)]
    out = plan.build(1, dtype=torch.float64)([hidden[k] for k in plan.layers])
    # base 23; mean(0..11) = 5.5; mean(12..23) = 17.5 (contains the base again; 24 never used)
    assert out[0, 0].tolist() == [23.0, 5.5, 17.5]


def test_group_mean_accumulates_in_float32():
    torch.manual_seed(1)
    base = torch.randn(1, 64, 8, dtype=torch.float64)
    feats64 = [base + 1e-3 * torch.randn_like(base) for _ in range(12)]
    feats = [f.to(torch.bfloat16) for f in feats64]
    fuser = ConcatFuser([8] * 12, terms=[list(range(12))])
    out = fuser(feats)
    assert out.dtype == torch.bfloat16
    exact = torch.stack([f.double() for f in feats]).mean(0)
    naive = feats[0]
    for f in feats[1:]:
        naive = naive + f
    naive = naive / 12
    err = (out.double() - exact).abs().max()
    assert err <= (exact.abs().max() * 2**-8)  # one bf16 rounding of the exact mean
    assert err < (naive.double() - exact).abs().max()


def test_layernorm_over_concatenated_width():
    feats = _feats(2)
    fuser = ConcatFuser([4, 4], norm=True, eps=1e-6)
    with torch.no_grad():
        fuser.norm.weight.normal_()
        fuser.norm.bias.normal_()
    expected = nn.functional.layer_norm(torch.cat(feats, -1), (8,), fuser.norm.weight, fuser.norm.bias, 1e-6)
    torch.testing.assert_close(fuser(feats), expected)
    fuser.reset_parameters()
    assert torch.equal(fuser.norm.weight, torch.ones(8))
    assert torch.equal(fuser.norm.bias, torch.zeros(8))
    assert "norm" in dict(fuser.named_children())
    assert ConcatFuser([4]).norm is None
    assert not list(ConcatFuser([4]).parameters())


def test_drop_first_token():
    feats = _feats(2, t=6)
    fuser = ConcatFuser([4, 4], drop_first_token=True)
    torch.testing.assert_close(fuser(feats), torch.cat([f[:, 1:] for f in feats], -1))
    with pytest.raises(ValueError, match="drop_first_token needs at least 2 tokens, got 1"):
        fuser(_feats(2, t=1))


def test_clip_and_siglip_shapes():
    clip = torch.randn(1, 576, 1024)
    dci = ConcatFuser.from_preset("dense_connector_dci", dim=1024, depth=24)
    assert dci([clip] * dci.num_inputs).shape == (1, 576, 3072)
    sci = ConcatFuser.from_preset("dense_connector_sci", dim=1024, depth=24)
    assert sci([clip] * 3).shape == (1, 576, 3072)
    siglip = torch.randn(1, 729, 1152)
    dci_s = ConcatFuser.from_preset("dense_connector_dci", dim=1152, depth=27)
    assert dci_s([siglip] * dci_s.num_inputs).shape == (1, 729, 3456)


def test_repr_and_config():
    fuser = ConcatFuser([4] * 3, terms=[2, [0, 1]], drop_first_token=True)
    assert fuser.extra_repr() == "in_dims=[4] * 3, terms=[2, mean[0, 1]], out_dim=8, drop_first_token=True"
    assert fuser.get_config() == {
        "in_dims": [4, 4, 4], "terms": [2, [0, 1]], "norm": False, "eps": 1e-5, "drop_first_token": True
    }
    assert "norm=True, eps=1e-05" in repr(ConcatFuser([4, 5], norm=True))


def test_construction_errors():
    with pytest.raises(TypeError, match="ConcatFuser: in_dims expected a non-empty sequence of widths, got 4"):
        ConcatFuser(4)
    with pytest.raises(ValueError, match=r"ConcatFuser: in_dims\[1\] expected a positive int, got 0"):
        ConcatFuser([4, 0])
    with pytest.raises(ValueError, match=r"terms\[1\] refers to input 5, but there are 3 inputs \(0..2\)"):
        ConcatFuser([4] * 3, terms=[0, [1, 5], 2])
    with pytest.raises(ValueError, match=r"ConcatFuser: inputs \[1\] are not used by any term"):
        ConcatFuser([4] * 3, terms=[0, 2])
    with pytest.raises(ValueError, match=r"terms\[0\] lists an input twice: \[0, 0\]"):
        ConcatFuser([4], terms=[[0, 0]])
    with pytest.raises(ValueError, match=r"terms\[0\] averages inputs \[0, 1\] of different widths \[4, 5\]"):
        ConcatFuser([4, 5], terms=[[0, 1]])
    with pytest.raises(TypeError, match=r"terms\[0\] expected an input index or a non-empty sequence"):
        ConcatFuser([4], terms=["0"])
    with pytest.raises(TypeError, match="terms expected a non-empty sequence"):
        ConcatFuser([4], terms=[])
    with pytest.raises(TypeError, match="preset 'dense_connector_sti' builds a TokenConcatFuser"):
        ConcatFuser.from_preset("dense_connector_sti", dim=8, depth=24)


def test_forward_errors():
    fuser = ConcatFuser([4, 4])
    with pytest.raises(ValueError, match=r"ConcatFuser.forward: features expected 2 tensors, got 3"):
        fuser(_feats(3))
    with pytest.raises(ValueError, match=r"ConcatFuser.forward: features\[1\] expected shape \(B, N, 4\), got \(2, 5, 3\)"):
        fuser([torch.randn(2, 5, 4), torch.randn(2, 5, 3)])
    with pytest.raises(ValueError, match=r"features\[1\] has batch size 1 but features\[0\] has 2"):
        fuser([torch.randn(2, 5, 4), torch.randn(1, 5, 4)])
    with pytest.raises(ValueError, match=r"features\[1\] has 6 tokens but features\[0\] has 5"):
        fuser([torch.randn(2, 5, 4), torch.randn(2, 6, 4)])
    with pytest.raises(TypeError, match="features expected a sequence"):
        fuser(torch.randn(2, 2, 5, 4))
