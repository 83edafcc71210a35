import pytest
import torch
import torch.nn.functional as F

from layerfuse import WeightedSumFuser


def _feats(n, b=2, t=5, c=4, dtype=torch.float64):
    return [torch.randn(b, t, c, dtype=dtype) for _ in range(n)]


@pytest.mark.parametrize("normalize", ["softmax", "none"])
def test_starts_as_the_uniform_mean(normalize):
    feats = _feats(5)
    fuser = WeightedSumFuser(4, 5, normalize=normalize, dtype=torch.float64)
    torch.testing.assert_close(fuser(feats), torch.stack(feats).mean(0), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(fuser.mixing_weights(), torch.full((5,), 0.2, dtype=torch.float64))


def test_softmax_weights_and_init():
    fuser = WeightedSumFuser(4, 3, init_weights=[0.5, 0.3, 0.2], dtype=torch.float64)
    torch.testing.assert_close(fuser.mixing_weights(), torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    with torch.no_grad():
        fuser.layer_weights.normal_()
    w = fuser.mixing_weights()
    assert torch.isclose(w.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert (w > 0).all()
    feats = _feats(3)
    torch.testing.assert_close(fuser(feats), sum(wi * f for wi, f in zip(w, feats)))
    fuser.reset_parameters()
    torch.testing.assert_close(fuser.mixing_weights(), torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))


def _lln_reference(fuser, feats):
    w = fuser.mixing_weights()
    total = 0
    for i, f in enumerate(feats):
        normed = F.layer_norm(f, (fuser.dim,), fuser.norm_weight[i], fuser.norm_bias[i], fuser.eps)
        total = total + w[i] * F.linear(normed, fuser.proj_weight[i], fuser.proj_bias[i])
    return total


def test_lln_layerscale_equals_per_layer_loop():
    fuser = WeightedSumFuser(4, 3, normalize="none", layer_proj=True, layer_proj_dim=6, dtype=torch.float64)
    with torch.no_grad():
        for p in fuser.parameters():
            p.normal_()
    feats = _feats(3)
    out = fuser(feats)
    assert out.shape == (2, 5, 6)
    assert fuser.out_dim == 6
    torch.testing.assert_close(out, _lln_reference(fuser, feats), rtol=1e-12, atol=1e-12)


def test_one_hot_reduces_to_one_layers_lln():
    # specs §11 item 13: with alpha one-hot at layer k the branch is Lin_k(LN_k(P_k))
    fuser = WeightedSumFuser(4, 3, normalize="none", layer_proj=True, init_weights=[0, 1, 0], dtype=torch.float64)
    feats = _feats(3)
    expected = F.linear(F.layer_norm(feats[1], (4,)), fuser.proj_weight[1], fuser.proj_bias[1])
    torch.testing.assert_close(fuser(feats), expected, rtol=1e-12, atol=1e-12)


def test_lln_init_matches_nn_linear_statistics():
    fuser = WeightedSumFuser(64, 2, layer_proj=True)
    bound = 1 / 8  # kaiming_uniform(a=sqrt(5)) and the bias both give U(+-1/sqrt(fan_in))
    assert fuser.proj_weight.abs().max() <= bound
    assert fuser.proj_weight.abs().max() > 0.9 * bound
    assert fuser.proj_bias.abs().max() <= bound
    assert torch.equal(fuser.norm_weight, torch.ones(2, 64))
    assert torch.equal(fuser.norm_bias, torch.zeros(2, 64))


def test_gradients_reach_every_parameter():
    fuser = WeightedSumFuser(4, 3, layer_proj=True)
    fuser(_feats(3, dtype=torch.float32)).square().sum().backward()
    for name, p in fuser.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_comm_presets():
    clip = WeightedSumFuser.from_preset("comm_clip", dim=8, depth=24)
    assert clip.num_inputs == 24
    assert clip.normalize == "none"
    assert clip.out_dim == 8
    torch.testing.assert_close(clip.mixing_weights(), torch.full((24,), 1 / 24))
    assert WeightedSumFuser.from_preset("comm_dino", dim=8, depth=24).num_inputs == 6


def test_bf16_accumulates_in_float32():
    feats64 = [1 + 1e-3 * torch.randn(1, 16, 4, dtype=torch.float64) for _ in range(8)]
    fuser = WeightedSumFuser(4, 8, dtype=torch.bfloat16)
    out = fuser([f.to(torch.bfloat16) for f in feats64])
    assert out.dtype == torch.bfloat16
    exact = torch.stack([f.to(torch.bfloat16).double() for f in feats64]).mean(0)
    assert (out.double() - exact).abs().max() <= 2**-8


def test_repr_and_config():
    fuser = WeightedSumFuser(4, 2, normalize="none", layer_proj=True, layer_proj_dim=3)
    assert repr(fuser).startswith(
        "WeightedSumFuser(dim=4, num_inputs=2, normalize='none', layer_proj=True, layer_proj_dim=3, eps=1e-05)"
    )
    assert fuser.get_config() == {
        "dim": 4, "num_inputs": 2, "normalize": "none", "layer_proj": True, "layer_proj_dim": 3,
        "init_weights": None, "eps": 1e-5,
    }
    assert WeightedSumFuser(4, 2).proj_weight is None


def test_errors():
    with pytest.raises(ValueError, match="normalize expected one of 'softmax', 'none', got 'sum'"):
        WeightedSumFuser(4, 2, normalize="sum")
    with pytest.raises(ValueError, match="layer_proj_dim=3 needs layer_proj=True"):
        WeightedSumFuser(4, 2, layer_proj_dim=3)
    with pytest.raises(ValueError, match="init_weights expected 2 values"):
        WeightedSumFuser(4, 2, init_weights=[1.0])
    with pytest.raises(ValueError, match=r"must be positive and sum to 1, got \[1.0, 0.0\]"):
        WeightedSumFuser(4, 2, init_weights=[1, 0])
    fuser = WeightedSumFuser(4, 2)
    with pytest.raises(ValueError, match=r"WeightedSumFuser.forward: features expected 2 tensors, got 1"):
        fuser(_feats(1, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"features\[1\] has 6 tokens but features\[0\] has 5"):
        fuser([torch.randn(2, 5, 4), torch.randn(2, 6, 4)])
    with pytest.raises(TypeError, match=r"features\[0\] has dtype torch.float64 but the module's parameters are torch.float32"):
        fuser(_feats(2))
    with pytest.raises(TypeError, match="preset 'vip_llava' builds a ConcatFuser"):
        WeightedSumFuser.from_preset("vip_llava", dim=4, depth=24)
