import math

import pytest
import torch

from layerfuse.layers import MultiScaleDeformableAttention
from layerfuse.layers.deformable_attention import direction_grid
from layerfuse.ops import reference_points
from mmfuser_oracle import oracle_deformable_attention, oracle_reference_points

# u_h for 16 heads, as the authors' initialisation produces it (specs §1.4).
U16 = [(1, 0), (1, 0.4142), (1, 1), (0.4142, 1), (0, 1), (-0.4142, 1), (-1, 1), (-1, 0.4142),
       (-1, 0), (-1, -0.4142), (-1, -1), (-0.4142, -1), (0, -1), (0.4142, -1), (1, -1), (1, -0.4142)]


def perturbed(attn: MultiScaleDeformableAttention, scale: float = 0.3) -> MultiScaleDeformableAttention:
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * scale)
    return attn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sampling_offsets_bias_is_the_direction_grid(dtype):
    attn = MultiScaleDeformableAttention(64, num_levels=4, heads=16, points=4, dtype=dtype)
    bias = attn.sampling_offsets.bias.detach().double().view(16, 4, 4, 2)
    expected = torch.tensor(U16, dtype=torch.float64)[:, None, None, :] * torch.arange(1, 5.0)[None, None, :, None]
    tol = 1e-4 if dtype != torch.bfloat16 else 4e-2
    torch.testing.assert_close(bias, expected.expand(16, 4, 4, 2), atol=tol * 4, rtol=tol)
    assert torch.equal(bias[:, 0], bias[:, 3])  # identical across levels
    for t in (attn.sampling_offsets.weight, attn.attention_weights.weight, attn.attention_weights.bias,
              attn.value_proj.bias, attn.output_proj.bias):
        assert not t.any()
    # head 1, point p starts at (p + 1) * (1, tan(pi/8)) pixels
    torch.testing.assert_close(direction_grid(16, 1, 4)[1, 0, 2], torch.tensor([3.0, 3 * math.tan(math.pi / 8)],
                                                                               dtype=torch.float64))


def test_reset_parameters_is_xavier_and_repeatable():
    attn = MultiScaleDeformableAttention(64, num_levels=2, heads=4, points=2)
    bound = math.sqrt(6 / (64 + 64))
    assert attn.value_proj.weight.abs().max() <= bound
    assert attn.value_proj.weight.std() > bound / 3  # filled, not zero
    perturbed(attn)
    attn.reset_parameters()
    assert not attn.attention_weights.weight.any()
    torch.testing.assert_close(attn.sampling_offsets.bias, direction_grid(4, 2, 2).float().flatten())


def test_meta_device_init_allocates_nothing():
    attn = MultiScaleDeformableAttention(1024, num_levels=4, heads=16, points=4, device="meta")
    assert attn.sampling_offsets.bias.is_meta
    assert attn.sampling_offsets.weight.shape == (512, 1024)
    assert attn.attention_weights.weight.shape == (256, 1024)


def test_reference_points_match_the_authors():
    pts = reference_points((24, 24))
    assert pts.dtype == torch.float32
    assert pts.shape == (576, 2)
    torch.testing.assert_close(pts[0], torch.tensor([1 / 48, 1 / 48]))
    torch.testing.assert_close(pts[1], torch.tensor([3 / 48, 1 / 48]))
    torch.testing.assert_close(pts[24], torch.tensor([1 / 48, 3 / 48]))
    for grid in [(24, 24), (3, 7), (5, 2)]:
        # bit-identical to the authors' float32 linspace / meshgrid formulation
        assert torch.equal(reference_points(grid), oracle_reference_points(*grid))
    torch.testing.assert_close(reference_points((2, 3))[5], torch.tensor([5 / 6, 3 / 4]))


def test_reference_points_rejects_bad_grid():
    with pytest.raises(TypeError, match=r"reference_points: grid expected a pair of ints"):
        reference_points(24)
    with pytest.raises(ValueError, match=r"reference_points: grid expected positive sides"):
        reference_points((0, 3))


@pytest.mark.parametrize("ref_kind", ["shared", "batch", "per_level"])
def test_forward_matches_grid_sample_oracle_on_mixed_grids(ref_kind):
    shapes = [(3, 5), (2, 2), (4, 1)]
    attn = perturbed(MultiScaleDeformableAttention(24, num_levels=3, heads=3, points=2, backend="pytorch",
                                                   dtype=torch.float64))
    query = torch.randn(2, 7, 24, dtype=torch.float64)
    value = torch.randn(2, sum(h * w for h, w in shapes), 24, dtype=torch.float64)
    ref = torch.rand(7, 2, dtype=torch.float64)
    if ref_kind == "batch":
        ref = torch.rand(2, 7, 2, dtype=torch.float64)
    elif ref_kind == "per_level":
        ref = torch.rand(2, 7, 3, 2, dtype=torch.float64)
    out = attn(query, ref, value, shapes)
    oracle_ref = ref if ref_kind != "batch" else ref[:, :, None, :].expand(2, 7, 3, 2)
    with torch.no_grad():
        expected = oracle_deformable_attention(attn, query, oracle_ref, value, shapes)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 6e-2), (torch.float16, 1e-2)])
def test_half_precision_forward_backward_close_to_float32(dtype, tol):
    attn = perturbed(MultiScaleDeformableAttention(32, num_levels=2, heads=4, points=2))
    query, value = torch.randn(2, 6, 32), torch.randn(2, 6 + 2, 32)
    shapes, ref = [(2, 3), (1, 2)], reference_points((2, 3))
    expected = attn(query, ref, value, shapes)
    half = MultiScaleDeformableAttention(32, num_levels=2, heads=4, points=2, dtype=dtype)
    half.load_state_dict(attn.state_dict())
    q = query.to(dtype).requires_grad_()
    out = half(q, ref, value.to(dtype), shapes)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert q.grad.dtype == dtype
    assert torch.isfinite(q.grad).all()
    torch.testing.assert_close(out.float(), expected, atol=tol * expected.abs().max().item(), rtol=0)


def test_softmax_and_locations_run_in_float32_under_bfloat16(monkeypatch):
    import layerfuse.layers.deformable_attention as module

    captured = {}
    original = module.ms_deform_attn

    def capture(value, shapes, loc, weights, **kwargs):
        captured.update(value=value, loc=loc, weights=weights)
        return original(value, shapes, loc, weights, **kwargs)

    monkeypatch.setattr(module, "ms_deform_attn", capture)
    attn = MultiScaleDeformableAttention(16, num_levels=1, heads=2, points=3, dtype=torch.bfloat16)
    out = attn(torch.randn(1, 4, 16, dtype=torch.bfloat16), reference_points((2, 2)),
               torch.randn(1, 4, 16, dtype=torch.bfloat16), [(2, 2)])
    assert out.dtype == captured["value"].dtype == torch.bfloat16
    assert captured["weights"].dtype == captured["loc"].dtype == torch.float32
    torch.testing.assert_close(captured["weights"].sum((-1, -2)), torch.ones(1, 4, 2))


def test_extra_repr():
    attn = MultiScaleDeformableAttention(32, num_levels=2, heads=4, points=3)
    assert attn.extra_repr() == "dim=32, num_levels=2, heads=4, points=3, backend='auto'"


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match=r"MultiScaleDeformableAttention: dim=30 expected a multiple of heads=4"):
        MultiScaleDeformableAttention(30, heads=4)
    with pytest.raises(ValueError, match=r"MultiScaleDeformableAttention: points expected a positive int, got 0"):
        MultiScaleDeformableAttention(32, heads=4, points=0)
    with pytest.raises(ValueError, match=r"MultiScaleDeformableAttention: backend expected one of 'auto', 'pytorch'"):
        MultiScaleDeformableAttention(32, heads=4, backend="cuda")


def test_bad_forward_inputs():
    attn = MultiScaleDeformableAttention(16, num_levels=2, heads=2, points=2)
    q, v, ref = torch.randn(2, 6, 16), torch.randn(2, 8, 16), reference_points((2, 3))
    where = r"MultiScaleDeformableAttention\.forward: "
    with pytest.raises(ValueError, match=where + r"query expected shape \(B, N, 16\), got \(2, 6, 8\)"):
        attn(torch.randn(2, 6, 8), ref, v, [(2, 3), (1, 2)])
    with pytest.raises(ValueError, match=where + r"spatial_shapes expected 2 \(H, W\) pairs"):
        attn(q, ref, v, [(2, 4)])
    with pytest.raises(ValueError, match=where + r"spatial_shapes \[\(2, 3\), \(1, 1\)\] cover 7 value tokens but value has 8"):
        attn(q, ref, v, [(2, 3), (1, 1)])
    with pytest.raises(ValueError, match=where + r"reference_points expected shape \(6, 2\) or"):
        attn(q, reference_points((3, 3)), v, [(2, 3), (1, 2)])
    with pytest.raises(ValueError, match=where + r"value has batch size 1 but query has 2"):
        attn(q, ref, v[:1], [(2, 3), (1, 2)])
    with pytest.raises(TypeError, match=where + r"spatial_shapes expected a sequence"):
        attn(q, ref, v, torch.tensor([[2, 3], [1, 2]]))


def test_padding_mask_zeroes_the_padded_values():
    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention(8, num_levels=1, heads=2, points=2, dtype=torch.float64)
    value = torch.randn(1, 12, 8, dtype=torch.float64)
    query = torch.randn(1, 12, 8, dtype=torch.float64)
    points = reference_points((3, 4)).double()[None]
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, 3::4] = True  # the last column is padding
    changed = value.clone()
    changed[mask] = 1e3  # whatever the padding holds, the masked call reads zeros there
    a = attn(query, points, value, [(3, 4)], padding_mask=mask)
    b = attn(query, points, changed, [(3, 4)], padding_mask=mask)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, attn(query, points, value, [(3, 4)]))


def test_padding_mask_is_checked():
    attn = MultiScaleDeformableAttention(8, num_levels=1, heads=2, points=2)
    value = torch.randn(1, 12, 8)
    args = (torch.randn(1, 12, 8), reference_points((3, 4)), value, [(3, 4)])
    with pytest.raises(TypeError, match=r"padding_mask expected a bool tensor \(B, S\), got torch.float32"):
        attn(*args, padding_mask=torch.zeros(1, 12))
    with pytest.raises(ValueError, match=r"padding_mask expected shape \(1, 12\) \(B, S of value\) on cpu, got \(1, 11\)"):
        attn(*args, padding_mask=torch.zeros(1, 11, dtype=torch.bool))
