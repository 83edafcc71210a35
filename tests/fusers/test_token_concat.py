import pytest
import torch
import torch.nn.functional as F

from layerfuse import LayerFeatures, TokenConcatFuser


def test_sti_pooled_token_is_mean_of_eight_consecutive_tokens():
    base, a, b = (torch.randn(2, 25, 3, dtype=torch.float64) for _ in range(3))
    out = TokenConcatFuser(3, 3)([base, a, b])
    assert out.shape == (2, 25 + 3 + 3, 3)  # 25 tokens -> 3 windows, the 25th token is dropped
    assert torch.equal(out[:, :25], base)
    for k in range(3):
        torch.testing.assert_close(out[:, 25 + k], a[:, 8 * k : 8 * k + 8].mean(1), rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(out[:, 28 + k], b[:, 8 * k : 8 * k + 8].mean(1), rtol=1e-14, atol=1e-14)


def test_1d_equals_avg_pool1d_as_the_authors_code_it():
    feats = [torch.randn(2, 729, 5) for _ in range(3)]
    out = TokenConcatFuser(5, 3)(feats)
    ref = [F.avg_pool1d(f.transpose(1, 2), 8, 8).transpose(1, 2) for f in feats[1:]]
    torch.testing.assert_close(out, torch.cat([feats[0], *ref], 1))
    assert out.shape == (2, 729 + 91 + 91, 5)  # SigLIP: windows straddle rows of 27


def test_2d_pooling_respects_the_grid():
    gh, gw = 6, 10
    feats = [torch.randn(2, gh * gw, 4) for _ in range(2)]
    fuser = TokenConcatFuser(4, 2, pool="2d", window=(2, 4))
    out = fuser(feats, grid=(gh, gw))
    maps = feats[1].transpose(1, 2).reshape(2, 4, gh, gw)
    ref = F.avg_pool2d(maps, (2, 4)).flatten(2).transpose(1, 2)  # 3 x 2, right columns dropped
    torch.testing.assert_close(out[:, gh * gw :], ref)
    assert fuser.num_output_tokens(60, (gh, gw)) == out.shape[1] == 66


def test_2d_grid_sources():
    feats = LayerFeatures([torch.randn(1, 12, 4) for _ in range(2)], grid=(3, 4))
    fuser = TokenConcatFuser(4, 2, pool="2d", window=2)
    assert fuser(feats).shape == (1, 12 + 2, 4)  # grid from the tap
    default = TokenConcatFuser(4, 2, pool="2d", window=2, grid=(4, 3))
    assert default(list(feats)).shape == (1, 12 + 2, 4)
    with pytest.raises(ValueError, match="cannot tell the patch grid of 12 tokens"):
        fuser(list(feats))
    with pytest.raises(ValueError, match=r"grid \(2, 5\) = 10 tokens does not fit the features' 12 patch tokens"):
        fuser(list(feats), grid=(2, 5))
    with pytest.raises(ValueError, match=r"grid=\(4, 3\) contradicts the grid the features carry"):
        fuser(feats, grid=(4, 3))  # an explicit grid never silently overrides the tap's
    with pytest.raises(ValueError, match=r"grid \(1, 12\) is smaller than the pooling window \(2, 2\)"):
        fuser(list(feats), grid=(1, 12))


def test_clip_and_siglip_shapes():
    sti = TokenConcatFuser.from_preset("dense_connector_sti", dim=1024, depth=24)
    assert sti([torch.randn(1, 576, 1024)] * 3).shape == (1, 720, 1024)
    sti_s = TokenConcatFuser.from_preset("dense_connector_sti", dim=1152, depth=27)
    assert sti_s([torch.randn(1, 729, 1152)] * 3).shape == (1, 911, 1152)


def test_pool_accumulates_in_float32():
    x = (1 + 1e-3 * torch.randn(1, 64, 8, dtype=torch.float64)).to(torch.bfloat16)
    out = TokenConcatFuser(8, 2)([x, x])
    assert out.dtype == torch.bfloat16
    exact = x.double().reshape(1, 8, 8, 8).mean(2)
    assert (out[:, 64:].double() - exact).abs().max() <= 2**-8


def test_config_repr():
    fuser = TokenConcatFuser(4, 3, pool="2d", window=(2, 3), grid=(4, 6))
    assert repr(fuser) == "TokenConcatFuser(dim=4, num_inputs=3, pool='2d', window=(2, 3), grid=(4, 6))"
    assert fuser.get_config() == {"dim": 4, "num_inputs": 3, "pool": "2d", "window": [2, 3], "grid": [4, 6]}
    assert TokenConcatFuser(4, 2).get_config()["window"] == 8


def test_errors():
    with pytest.raises(ValueError, match="TokenConcatFuser: num_inputs expected at least 2"):
        TokenConcatFuser(4, 1)
    with pytest.raises(ValueError, match="TokenConcatFuser: pool expected one of '1d', '2d', got '3d'"):
        TokenConcatFuser(4, 2, pool="3d")
    with pytest.raises(TypeError, match="window expected an int for pool='1d', got"):
        TokenConcatFuser(4, 2, window=(2, 2))
    with pytest.raises(TypeError, match="window expected an int or a pair"):
        TokenConcatFuser(4, 2, pool="2d", window=(1, 2, 3))
    with pytest.raises(ValueError, match="grid is only used by pool='2d'"):
        TokenConcatFuser(4, 2, grid=(2, 2))
    fuser = TokenConcatFuser(4, 2, window=4)
    # pool='1d' does not need the grid but accepts one that fits the tokens (one calling convention)
    assert fuser([torch.randn(1, 4, 4)] * 2, grid=(2, 2)).shape == (1, 5, 4)
    with pytest.raises(ValueError, match=r"grid \(2, 3\) = 6 tokens does not fit the features' 4 patch tokens"):
        fuser([torch.randn(1, 4, 4)] * 2, grid=(2, 3))
    with pytest.raises(ValueError, match="3 tokens are fewer than the pooling window 4"):
        fuser([torch.randn(1, 3, 4)] * 2)
    with pytest.raises(ValueError, match=r"features\[1\] has 9 tokens but features\[0\] has 8"):
        fuser([torch.randn(1, 8, 4), torch.randn(1, 9, 4)])
    with pytest.raises(ValueError, match=r"features\[0\] expected shape \(B, N, 4\), got \(1, 8, 5\)"):
        fuser([torch.randn(1, 8, 5), torch.randn(1, 8, 4)])
    with pytest.raises(TypeError, match=r"TokenConcatFuser.from_preset: preset 'lin_ed_18' builds a ConcatFuser"):
        TokenConcatFuser.from_preset("lin_ed_18", dim=4, depth=24)
