import pytest
import torch
import torch.nn.functional as F

from layerfuse.analysis import METRICS, LinearCKA, PooledCosine, TokenCosine, accumulator


def features(num_layers=4, batch=5, tokens=6, width=8, dtype=torch.float64):
    return [torch.randn(batch, tokens, width, dtype=dtype) for _ in range(num_layers)]


def compute(cls, *batches):
    acc = cls()
    for batch in batches:
        acc.update(batch)
    return acc.compute()


def split(feats, sizes):
    out, start = [], 0
    for size in sizes:
        out.append([f[start : start + size] for f in feats])
        start += size
    return out


def reference_cka(x, y):
    x = x.reshape(-1, x.shape[-1]).double()
    y = y.reshape(-1, y.shape[-1]).double()
    x, y = x - x.mean(0), y - y.mean(0)
    return (y.T @ x).square().sum() / ((x.T @ x).norm() * (y.T @ y).norm())


@pytest.mark.parametrize("cls", list(METRICS.values()))
def test_symmetric_unit_diagonal_finite_float64(cls):
    s = compute(cls, features())
    assert s.shape == (4, 4)
    assert s.dtype == torch.float64
    assert s.device.type == "cpu"
    assert torch.isfinite(s).all()
    assert torch.equal(s, s.T)
    torch.testing.assert_close(s.diagonal(), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls", list(METRICS.values()))
def test_streaming_equals_one_shot(cls):
    feats = features(batch=7)
    one_shot = compute(cls, feats)
    streamed = compute(cls, *split(feats, [1, 4, 2]))
    torch.testing.assert_close(streamed, one_shot, rtol=0, atol=1e-12)
    assert not torch.allclose(one_shot, torch.eye(4, dtype=torch.float64), atol=1e-3)


@pytest.mark.parametrize("cls", list(METRICS.values()))
def test_chunked_reduction_equals_unchunked(cls, monkeypatch):
    feats = features(batch=3, tokens=10)
    whole = compute(cls, feats)
    monkeypatch.setattr(accumulator, "_CHUNK_ELEMENTS", 7 * 4 * 8)  # 7 rows per chunk
    torch.testing.assert_close(compute(cls, feats), whole, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls", list(METRICS.values()))
def test_float32_and_bf16_inputs_accumulate_in_float64(cls):
    f32 = features(dtype=torch.float32, batch=16, tokens=16, width=16)
    # float32 -> float64 is exact, so float64 sums give the float64 answer to rounding; float32 sums
    # would be off by ~1e-7.
    torch.testing.assert_close(compute(cls, f32), compute(cls, [f.double() for f in f32]), rtol=0, atol=1e-13)
    bf16 = [f.bfloat16() for f in f32]
    torch.testing.assert_close(compute(cls, bf16), compute(cls, [f.double() for f in bf16]), rtol=0, atol=1e-13)


def test_token_cosine_matches_formula():
    feats = features()
    expected = torch.tensor([[F.cosine_similarity(a, b, dim=-1).mean().item() for b in feats] for a in feats],
                            dtype=torch.float64)
    torch.testing.assert_close(compute(TokenCosine, feats), expected, rtol=0, atol=1e-12)


def test_pooled_cosine_matches_formula():
    feats = features()
    pooled = [f.mean(dim=1) for f in feats]
    expected = torch.tensor([[F.cosine_similarity(a, b, dim=-1).mean().item() for b in pooled] for a in pooled],
                            dtype=torch.float64)
    torch.testing.assert_close(compute(PooledCosine, feats), expected, rtol=0, atol=1e-12)


def test_pooled_ignores_token_order_but_token_cosine_does_not():
    x = torch.randn(4, 9, 8, dtype=torch.float64)
    shuffled = x[:, torch.randperm(9)]
    pooled = compute(PooledCosine, [x, shuffled])
    token = compute(TokenCosine, [x, shuffled])
    assert pooled[0, 1].item() == pytest.approx(1.0, abs=1e-12)
    assert token[0, 1].item() < 0.5


def test_zero_tokens_give_zero_cosine_not_nan():
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    s = compute(TokenCosine, [x, torch.zeros_like(x)])
    assert torch.isfinite(s).all()
    assert s[0, 1].item() == 0.0


def test_cka_matches_formula_with_different_widths():
    feats = [torch.randn(3, 5, c, dtype=torch.float64) for c in (4, 7, 6)]
    expected = torch.tensor([[reference_cka(a, b).item() for b in feats] for a in feats], dtype=torch.float64)
    torch.testing.assert_close(compute(LinearCKA, feats), expected, rtol=0, atol=1e-12)


def test_cka_invariant_to_orthogonal_transform_and_isotropic_scaling():
    feats = features(width=8)
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    transformed = [feats[0] @ q * 3.7, feats[1], feats[2] * 0.01, feats[3] @ q.T]
    torch.testing.assert_close(compute(LinearCKA, transformed), compute(LinearCKA, feats), rtol=0, atol=1e-12)
    assert compute(LinearCKA, [feats[0], feats[0] @ q * 5])[0, 1].item() == pytest.approx(1.0, abs=1e-12)
    # Not invariant to anisotropic scaling, so the check above can fail.
    stretched = feats[0] * torch.linspace(0.1, 10, 8, dtype=torch.float64)
    assert compute(LinearCKA, [feats[0], stretched])[0, 1].item() < 0.99


def test_cka_accurate_with_large_feature_means():
    feats = features(batch=6, tokens=16)
    shifted = [f + 1e4 * torch.randn(8, dtype=torch.float64) for f in feats]
    torch.testing.assert_close(compute(LinearCKA, *split(shifted, [2, 4])), compute(LinearCKA, feats),
                               rtol=0, atol=1e-9)


def test_cka_rejects_constant_layer():
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"LinearCKA.compute: layer position\(s\) \[1\] do not vary"):
        compute(LinearCKA, [x, torch.full_like(x, 2.5)])


def test_layout_errors():
    with pytest.raises(ValueError, match=r"TokenCosine.update: token-aligned cosine needs the same \(N, C\)"):
        TokenCosine().update([torch.randn(2, 3, 4), torch.randn(2, 3, 5)])
    with pytest.raises(ValueError, match=r"PooledCosine.update: pooled cosine needs the same width C .* \[4, 5\]"):
        PooledCosine().update([torch.randn(2, 3, 4), torch.randn(2, 6, 5)])
    with pytest.raises(ValueError, match=r"LinearCKA.update: CKA pairs the tokens .* got \[3, 6\]"):
        LinearCKA().update([torch.randn(2, 3, 4), torch.randn(2, 6, 4)])
    PooledCosine().update([torch.randn(2, 3, 4), torch.randn(2, 6, 4)])
    LinearCKA().update([torch.randn(2, 3, 4), torch.randn(2, 3, 9)])


def test_batches_must_keep_the_same_layers():
    acc = TokenCosine()
    acc.update(features(num_layers=3))
    with pytest.raises(ValueError, match=r"TokenCosine.update: every batch must have the same layers"):
        acc.update(features(num_layers=2))
    with pytest.raises(ValueError, match=r"every batch must have the same layers.*\(7, 8\)"):
        acc.update(features(num_layers=3, tokens=7))


def test_input_errors():
    with pytest.raises(ValueError, match=r"LinearCKA.compute: no features were added"):
        LinearCKA().compute()
    with pytest.raises(TypeError, match=r"TokenCosine.update: features expected a sequence"):
        TokenCosine().update(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"PooledCosine.update: features\[0\] expected a 3-d tensor"):
        PooledCosine().update([torch.randn(2, 4)])
    with pytest.raises(TypeError, match=r"features\[0\] expected a floating-point tensor"):
        TokenCosine().update([torch.ones(2, 3, 4, dtype=torch.long)])


def test_num_images_and_layers():
    acc = LinearCKA()
    assert acc.num_layers is None
    acc.update(features(batch=3))
    acc.update(features(batch=2))
    assert (acc.num_images, acc.num_layers) == (5, 4)
