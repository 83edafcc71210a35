"""CrossAttentionFuser: identity at init, windowed == masked full attention, grids, dtypes, errors."""

from __future__ import annotations

import pytest
import torch

from layerfuse import CrossAttentionFuser, LayerFeatures
from layerfuse.layers import attention as attention_layer
from layerfuse.ops.attention import attention, window_mask

LORA_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def perturbed(fuser: CrossAttentionFuser, scale: float = 0.3) -> CrossAttentionFuser:
    """Non-zero layer-scales so the attention branches reach the output."""
    with torch.no_grad():
        for name, p in fuser.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.randn_like(p) * scale)
    return fuser


def features(grid=(3, 4), levels=2, dim=16, batch=2, dtype=torch.float32, level_grids=None):
    grids = level_grids or [grid] * levels
    return [torch.randn(batch, h * w, dim, dtype=dtype) for h, w in grids] + [
        torch.randn(batch, grid[0] * grid[1], dim, dtype=dtype)
    ]


@pytest.mark.parametrize(
    "options",
    [{}, {"window": 2}, {"self_attn": True, "mlp_ratio": 2.0}, {"window": 1, "self_attn": True, "pos_embed": False}],
)
def test_identity_at_initialisation(options):
    fuser = CrossAttentionFuser(16, num_levels=2, heads=2, grid=(3, 4), **options)
    feats = features()
    assert torch.equal(fuser(feats), feats[-1])


def dense_masked(q, k, v, *, query_grid, key_grids, window, dropout_p=0.0, scale=None, backend="auto", tile=None):
    return attention(q, k, v, mask=window_mask(query_grid, key_grids, window), dropout_p=dropout_p, scale=scale,
                     backend=backend)


@pytest.mark.parametrize(
    ("grid", "level_grids", "window"),
    [((3, 4), None, 2), ((4, 3), [(8, 6), (2, 3)], 2), ((2, 5), [(2, 5), (4, 10)], 1)],
)
def test_windowed_equals_full_attention_with_the_explicit_mask(monkeypatch, grid, level_grids, window):
    fuser = perturbed(CrossAttentionFuser(16, 2, 2, window=window, self_attn=True, mlp_ratio=1.0,
                                          dtype=torch.float64))
    feats = features(grid, dtype=torch.float64, level_grids=level_grids)
    out = fuser(feats, grid=grid, level_grids=level_grids)
    monkeypatch.setattr(attention_layer, "windowed_attention", dense_masked)
    torch.testing.assert_close(out, fuser(feats, grid=grid, level_grids=level_grids), atol=1e-12, rtol=1e-12)


def test_window_covering_every_grid_equals_full_attention():
    windowed = perturbed(CrossAttentionFuser(16, 2, 2, window=3, grid=(3, 3), self_attn=True, dtype=torch.float64))
    full = CrossAttentionFuser(16, 2, 2, grid=(3, 3), self_attn=True, dtype=torch.float64)
    full.load_state_dict(windowed.state_dict())
    feats = features((3, 3), dtype=torch.float64)
    torch.testing.assert_close(windowed(feats), full(feats))
    assert not torch.allclose(windowed(feats), feats[-1])


def test_gradcheck_float64():
    for window in (None, 1):
        fuser = perturbed(CrossAttentionFuser(8, 2, 2, window=window, grid=(2, 3), self_attn=True, mlp_ratio=1.0,
                                              dtype=torch.float64), scale=0.5)
        feats = [f.requires_grad_() for f in features((2, 3), dim=8, batch=1, dtype=torch.float64)]
        assert torch.autograd.gradcheck(lambda *xs, m=fuser: m(list(xs)), feats, eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.slow
def test_windowed_fuser_compiles_with_fullgraph():
    # the full-attention path under compile is covered by tests/ops/attention (attention() itself)
    fuser = perturbed(CrossAttentionFuser(16, 2, 2, window=2, grid=(2, 3)))
    feats = [f.requires_grad_() for f in features((2, 3))]
    expected = fuser(feats)
    # aot_eager traces forward and backward as inductor would see them, without code generation time
    compiled = torch.compile(fuser, fullgraph=True, backend="aot_eager")
    out = compiled(feats)
    out.sum().backward()
    torch.testing.assert_close(out, expected)
    assert feats[0].grad is not None


@pytest.mark.parametrize("window", [None, 2])
def test_bfloat16_module_and_autocast_close_to_float32(window):
    fuser = perturbed(CrossAttentionFuser(32, 2, 4, window=window, grid=(3, 4), self_attn=True, mlp_ratio=1.0))
    feats = features(dim=32)
    expected = fuser(feats)
    tol = 5e-2 * expected.abs().max().item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fuser([f.bfloat16() for f in feats])
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=0)
    out.float().sum().backward()
    assert fuser.cross_attn.to_q.weight.grad.dtype == torch.float32
    half = fuser.to(torch.bfloat16)
    out = half([f.bfloat16() for f in feats])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=0)


@pytest.mark.parametrize("batch", [1, 3])
def test_non_square_grid_and_per_level_grids(batch):
    fuser = perturbed(CrossAttentionFuser(16, 3, 2, window=2))
    level_grids = [(2, 7), (4, 14), (6, 21)]
    feats = features((2, 7), batch=batch, level_grids=level_grids)
    out = fuser(feats, grid=(2, 7), level_grids=level_grids)
    assert out.shape == (batch, 14, 16)
    assert torch.isfinite(out).all()
    # each image is fused on its own
    torch.testing.assert_close(out[-1:], fuser([f[-1:] for f in feats], grid=(2, 7), level_grids=level_grids))


def test_grid_comes_from_layer_features():
    fuser = perturbed(CrossAttentionFuser(16, 2, 2, window=2))
    feats = features((3, 5))
    tapped = LayerFeatures(feats, grid=(3, 5), layers=(3, 8, 23))
    torch.testing.assert_close(fuser(tapped), fuser(feats, grid=(3, 5)))


def test_query_index_selects_the_query_layer():
    last = perturbed(CrossAttentionFuser(16, 2, 2, grid=(3, 4)))
    first = CrossAttentionFuser(16, 2, 2, grid=(3, 4), query_index=0)
    first.load_state_dict(last.state_dict())
    feats = features()
    torch.testing.assert_close(first([feats[-1], *feats[:-1]]), last(feats))


def test_without_positions_or_window_token_counts_are_free():
    fuser = perturbed(CrossAttentionFuser(16, 2, 2, pos_embed=False))
    feats = [torch.randn(2, 5, 16), torch.randn(2, 11, 16), torch.randn(2, 7, 16)]
    assert fuser(feats).shape == (2, 7, 16)


def test_position_and_level_embeddings_matter():
    fuser = perturbed(CrossAttentionFuser(16, 2, 2, grid=(3, 4)))
    feats = features()
    swapped = [feats[1], feats[0], feats[2]]
    assert not torch.allclose(fuser(feats), fuser(swapped))  # the level embedding tells the layers apart


def test_no_leaf_module_name_collides_with_llm_lora_targets():
    fuser = CrossAttentionFuser(16, 2, 2, self_attn=True, mlp_ratio=2.0)
    leaves = {name.rsplit(".", 1)[-1] for name, _ in fuser.named_modules() if name}
    params = {name.rsplit(".", 2)[-2] for name, _ in fuser.named_parameters() if "." in name}
    assert not (leaves | params) & LORA_TARGETS
    assert {"to_q", "to_kv", "to_out", "ffn_in", "ffn_out"} <= leaves


def test_reset_parameters_restores_identity():
    fuser = perturbed(CrossAttentionFuser(16, 2, 2, grid=(3, 4), self_attn=True, mlp_ratio=1.0))
    feats = features()
    assert not torch.equal(fuser(feats), feats[-1])
    fuser.reset_parameters()
    assert torch.equal(fuser(feats), feats[-1])


def test_attention_dropout_only_in_training():
    fuser = perturbed(CrossAttentionFuser(16, 2, 2, grid=(3, 4), attn_drop=0.5))
    feats = features()
    fuser.eval()
    torch.testing.assert_close(fuser(feats), fuser(feats))
    fuser.train()
    assert not torch.allclose(fuser(feats), fuser(feats))


def test_save_and_load_round_trip(tmp_path):
    fuser = perturbed(CrossAttentionFuser(16, 2, 2, window=2, query_index=0, grid=(3, 4), self_attn=True,
                                          mlp_ratio=1.5, qkv_bias=False, eps=1e-5, backend="sdpa"))
    fuser.save_pretrained(tmp_path)
    loaded = CrossAttentionFuser.from_pretrained(tmp_path)
    assert loaded.get_config() == fuser.get_config()
    feats = features()
    torch.testing.assert_close(loaded(feats), fuser(feats), rtol=0, atol=0)
    assert "window=2" in repr(loaded)


def test_explicit_backend_is_used():
    fuser = perturbed(CrossAttentionFuser(16, 2, 2, grid=(3, 4), backend="eager", dtype=torch.float64))
    sdpa = CrossAttentionFuser(16, 2, 2, grid=(3, 4), dtype=torch.float64)
    sdpa.load_state_dict(fuser.state_dict())
    feats = features(dtype=torch.float64)
    torch.testing.assert_close(fuser(feats), sdpa(feats))
    assert fuser.backend == "eager"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"dim": 10, "heads": 4}, ValueError, "dim=10 expected a multiple of heads=4"),
        ({"dim": 6, "heads": 2}, ValueError, "pos_embed=True needs dim to be a multiple of 4, got dim=6"),
        ({"dim": 8, "heads": 2, "window": 0}, ValueError, "window expected a positive int, got 0"),
        ({"dim": 8, "heads": 2, "query_index": 3}, ValueError, r"query_index expected a position .* got 3"),
        ({"dim": 8, "heads": 2, "mlp_ratio": -1}, ValueError, "mlp_ratio expected a float >= 0"),
        ({"dim": 8, "heads": 2, "mlp_ratio": 0.01}, ValueError, "gives an MLP of width 0 at dim=8"),
        ({"dim": 8, "heads": 2, "backend": "flash"}, ValueError, "backend expected one of 'auto', "),
        ({"dim": 8, "heads": 2, "grid": (3,)}, TypeError, r"grid expected a pair of ints \(H, W\)"),
    ],
)
def test_constructor_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        CrossAttentionFuser(num_levels=2, **kwargs)


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda f: (f[:2], {}), ValueError, "features expected 3 tensors, got 2"),
        (lambda f: ([f[0][..., :8], *f[1:]], {}), ValueError, r"features\[0\] expected shape \(B, N, 16\)"),
        (lambda f: ([f[0][:1], *f[1:]], {}), ValueError, r"features\[0\] has batch size 1 but features\[1\] has 2|"
                                                          r"features\[1\] has batch size 2 but features\[0\] has 1"),
        (lambda f: (f, {"grid": (4, 4)}), ValueError, r"grid is \(4, 4\) = 16 tokens but the input has 12"),
        (lambda f: (f, {"grid": None, "_nogrid": True}), ValueError, r"cannot tell the patch grid of 12 tokens"),
        (lambda f: (f, {"level_grids": [(3, 4)]}), ValueError, r"level_grids expected 2 \(H, W\) pairs"),
        (lambda f: (f, {"level_grids": [(3, 4), (2, 6)], "grid": (3, 4)}), ValueError,
         r"window=3 does not fit level 1 with grid \(2, 6\)"),
        (lambda f: ([x.double() for x in f], {}), TypeError, "module's parameters are torch.float32"),
        (lambda f: (f[0], {}), TypeError, "features expected a sequence"),
    ],
)
def test_forward_errors(make, error, message):
    feats, kwargs = make(features())
    nogrid = kwargs.pop("_nogrid", False)
    fuser = CrossAttentionFuser(16, 2, 2, window=3, grid=None if nogrid else (3, 4))
    with pytest.raises(error, match=message):
        fuser(feats, **kwargs)


def test_window_larger_than_query_grid_with_self_attention():
    fuser = CrossAttentionFuser(16, 2, 2, window=3, self_attn=True)
    with pytest.raises(ValueError, match=r"window=3 does not fit the query \(self-attention\) with grid \(2, 6\)"):
        fuser(features((2, 6), level_grids=[(4, 12), (4, 12)]), grid=(2, 6), level_grids=[(4, 12), (4, 12)])
