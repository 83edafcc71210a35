import math

import pytest
import torch

from fixture_utils import assert_fixture_close, load_fixture
from layerfuse import FusionProjector, LayerFeatures, MMFuser, Projector, from_official
from layerfuse.fusers.pipeline import FusionProjector as PipelineFusionProjector
from mmfuser_oracle import oracle_mmfuser

FIXTURES = ["mmfuser_small", "mmfuser_two_levels"]


def official_key(name: str) -> str:
    """layerfuse parameter name -> the authors' key relative to mm_projector."""
    if name.startswith("fuser."):
        return "0." + name.removeprefix("fuser.")
    index, rest = name.removeprefix("projector.").split(".", 1)
    return f"{int(index) + 1}.{rest}"


def perturbed(fuser: MMFuser, scale: float = 0.2) -> MMFuser:
    """Move every parameter off its initial value so no branch is zero (gammas included)."""
    with torch.no_grad():
        for p in fuser.parameters():
            p.add_(torch.randn_like(p) * scale)
    return fuser


def with_small_offset_weights(fuser: MMFuser) -> MMFuser:
    """Shrink the query dependence of the sampling offsets, for comparisons across precisions.

    Bilinear sampling has a piecewise-constant derivative in the sampling position, so with large
    query-dependent offsets a rounding-sized change of an input flips whole terms of the gradient;
    small offset weights keep such comparisons about precision.
    """
    with torch.no_grad():
        for attn in (fuser.cross_attn, fuser.self_attn):
            attn.sampling_offsets.weight.mul_(0.05)
    return fuser


@pytest.mark.parametrize("name", FIXTURES)
def test_matches_the_authors_outputs_and_gradients(name):
    fx = load_fixture(name)
    checkpoint = fx.checkpoint("model.mm_projector.")
    module = from_official("mmfuser", checkpoint, heads=fx.config["n_heads"], points=fx.config["n_points"],
                           layers=list(range(-fx.config["n_levels"] - 1, 0)))
    assert isinstance(module, FusionProjector)
    assert module.fuser.num_levels == fx.config["n_levels"]
    assert next(module.parameters()).dtype == torch.float64
    inputs = [t.clone().requires_grad_() for t in fx.inputs()]
    grid = (fx.config["grid"], fx.config["grid"])
    block = module.fuser(inputs, grid=grid)
    assert_fixture_close(block, fx["block_output"], name="block_output")
    output = module.projector(block)
    assert_fixture_close(output, fx["output"], name="output")
    (output * fx["upstream"]).sum().backward()
    for i, x in enumerate(inputs):
        assert_fixture_close(x.grad, fx[f"grad.input.{i}"], name=f"grad.input.{i}")
    params = dict(module.named_parameters())
    assert {official_key(n) for n in params} == set(fx.with_prefix("grad.param."))
    for n, p in params.items():
        assert_fixture_close(p.grad, fx[f"grad.param.{official_key(n)}"], name=f"grad.param.{official_key(n)}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_identity_at_init_for_any_input(dtype):
    fuser = MMFuser(32, num_levels=3, heads=4, points=2, grid=(3, 4), dtype=dtype)
    feats = [torch.randn(2, 12, 32, dtype=dtype) * 10 ** i for i in range(4)]
    out = fuser(feats)
    assert out.dtype == dtype
    assert torch.equal(out, feats[-1])


def test_identity_at_init_under_autocast():
    fuser = MMFuser(32, num_levels=2, heads=4, points=2, grid=(2, 3))
    feats = [torch.randn(1, 6, 32, dtype=torch.bfloat16) for _ in range(3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fuser(feats)
    assert torch.equal(out, feats[-1].float())


def test_only_gamma1_gets_a_gradient_at_init():
    fuser = MMFuser(16, num_levels=2, heads=2, points=2, grid=(2, 3), dtype=torch.float64)
    feats = [torch.randn(2, 6, 16, dtype=torch.float64) for _ in range(3)]
    fuser(feats).square().sum().backward()
    nonzero = {n for n, p in fuser.named_parameters() if p.grad is not None and p.grad.any()}
    assert nonzero == {"gamma1"}


def test_state_dict_at_clip_l_scale():
    fuser = MMFuser(1024, device="meta")
    module = PipelineFusionProjector(fuser, Projector("mlp2x_gelu", 1024, 4096, device="meta"),
                                     layers=[-22, -17, -12, -7, -2])
    state = {official_key(k): tuple(v.shape) for k, v in module.state_dict().items()}
    assert len(state) == 28
    assert sum(p.numel() for p in fuser.parameters()) == 5_190_592
    assert sum(p.numel() for p in module.parameters()) == 26_170_304
    assert list(state)[:4] == ["0.gamma1", "0.gamma2", "0.cross_attn.sampling_offsets.weight",
                               "0.cross_attn.sampling_offsets.bias"]
    assert state["0.cross_attn.sampling_offsets.weight"] == (512, 1024)
    assert state["0.cross_attn.attention_weights.weight"] == (256, 1024)
    assert state["0.self_attn.sampling_offsets.weight"] == (128, 1024)
    assert state["0.self_attn.attention_weights.weight"] == (64, 1024)
    assert state["1.weight"] == (4096, 1024)
    assert state["3.weight"] == (4096, 4096)


@pytest.mark.parametrize(("levels", "params"), [(1, 4_600_192), (2, 4_796_992), (12, 6_764_992), (24, 9_126_592)])
def test_parameter_counts_of_lin_em_strategies(levels, params):
    fuser = MMFuser(1024, num_levels=levels, device="meta")
    assert sum(p.numel() for p in fuser.parameters()) == params


def test_non_square_grid_and_per_level_grids_match_the_oracle():
    fuser = perturbed(MMFuser(24, num_levels=3, heads=3, points=2, dtype=torch.float64))
    grids = [(4, 6), (2, 3), (6, 1)]
    values = [torch.randn(2, h * w, 24, dtype=torch.float64) for h, w in grids]
    query = torch.randn(2, 24, 24, dtype=torch.float64)
    out = fuser([*values, query], grid=(4, 6), level_grids=grids)
    with torch.no_grad():
        expected = oracle_mmfuser(fuser, values, query, (4, 6), grids)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    same = [torch.randn(2, 15, 24, dtype=torch.float64) for _ in range(4)]
    out = fuser(same, grid=(3, 5))
    with torch.no_grad():
        expected = oracle_mmfuser(fuser, same[:3], same[3], (3, 5), [(3, 5)] * 3)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_grid_resolution_order():
    fuser = perturbed(MMFuser(16, num_levels=1, heads=2, points=2, grid=(3, 4)))
    feats = [torch.randn(1, 12, 16) for _ in range(2)]
    from_default = fuser(feats)
    tapped = LayerFeatures(feats, grid=(4, 3), layers=(-7, -2))
    from_tap = fuser(tapped)
    assert not torch.allclose(from_default, from_tap)
    torch.testing.assert_close(from_tap, fuser(feats, grid=(4, 3)))
    torch.testing.assert_close(fuser(tapped, grid=(4, 3)), from_tap)  # an explicit grid that agrees is fine
    with pytest.raises(ValueError, match=r"grid=\(3, 4\) contradicts the grid the features carry \(features.grid=\(4, 3\)"):
        fuser(tapped, grid=(3, 4))  # never silently preferred over the tap's grid


def test_query_index_names_the_query_layer():
    last = perturbed(MMFuser(16, num_levels=2, heads=2, points=2, grid=(2, 3)))
    first = MMFuser(16, num_levels=2, heads=2, points=2, query_index=0, grid=(2, 3))
    first.load_state_dict(last.state_dict())
    a, b, q = (torch.randn(2, 6, 16) for _ in range(3))
    torch.testing.assert_close(first([q, a, b]), last([a, b, q]))
    middle = MMFuser(16, num_levels=2, heads=2, points=2, query_index=-2, grid=(2, 3))
    middle.load_state_dict(last.state_dict())
    torch.testing.assert_close(middle([a, q, b]), last([a, b, q]))


def test_batch_larger_than_64():
    fuser = perturbed(MMFuser(8, num_levels=2, heads=2, points=2, grid=(2, 2)))
    feats = [torch.randn(67, 4, 8) for _ in range(3)]
    out = fuser(feats)
    assert out.shape == (67, 4, 8)
    chunks = [fuser([f[i:i + 10] for f in feats]) for i in range(0, 67, 10)]
    torch.testing.assert_close(out, torch.cat(chunks))


@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
def test_half_precision_forward_backward_close_to_float32(dtype, tol):
    ref = with_small_offset_weights(perturbed(MMFuser(32, num_levels=2, heads=4, points=2, grid=(3, 3))))
    feats = [torch.randn(2, 9, 32, requires_grad=True) for _ in range(3)]
    expected = ref(feats)
    expected.square().sum().backward()
    half = MMFuser(32, num_levels=2, heads=4, points=2, grid=(3, 3), dtype=dtype)
    half.load_state_dict(ref.state_dict())
    half_feats = [f.detach().to(dtype).requires_grad_() for f in feats]
    out = half(half_feats)
    assert out.dtype == dtype
    out.float().square().sum().backward()
    scale = expected.abs().max().item()
    torch.testing.assert_close(out.float(), expected, atol=tol * scale, rtol=0)
    for f, h in zip(feats, half_feats):
        assert h.grad.dtype == dtype
        torch.testing.assert_close(h.grad.float(), f.grad, atol=4 * tol * f.grad.abs().max().item(), rtol=0)
    gamma_ref, gamma_half = ref.gamma1.grad, half.gamma1.grad.float()
    torch.testing.assert_close(gamma_half, gamma_ref, atol=4 * tol * gamma_ref.abs().max().item(), rtol=0)


def test_autocast_bfloat16_close_to_float32():
    fuser = perturbed(MMFuser(32, num_levels=2, heads=4, points=2, grid=(3, 3)))
    feats = [torch.randn(2, 9, 32) for _ in range(3)]
    expected = fuser(feats)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fuser([f.bfloat16() for f in feats])
    out.sum().backward()
    assert fuser.cross_attn.value_proj.weight.grad.dtype == torch.float32
    torch.testing.assert_close(out.float(), expected, atol=5e-2 * expected.abs().max().item(), rtol=0)


@pytest.mark.slow
def test_compiles_with_fullgraph():
    fuser = perturbed(MMFuser(16, num_levels=2, heads=2, points=2, grid=(2, 3)))
    feats = [torch.randn(2, 6, 16, requires_grad=True) for _ in range(3)]
    expected = fuser(feats)
    # aot_eager traces forward and backward exactly as inductor would see them, without codegen time
    compiled = torch.compile(fuser, fullgraph=True, backend="aot_eager")
    out = compiled(feats)
    out.sum().backward()
    torch.testing.assert_close(out, expected)
    assert feats[0].grad is not None


def test_gradcheck_float64():
    fuser = perturbed(MMFuser(8, num_levels=2, heads=2, points=2, grid=(2, 3), dtype=torch.float64), scale=0.5)
    feats = [torch.randn(1, 6, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(lambda *xs: fuser(list(xs)), feats, eps=1e-6, atol=1e-6, fast_mode=True)


def test_gradgradcheck_float64():
    fuser = perturbed(MMFuser(6, num_levels=1, heads=3, points=1, grid=(2, 2), dtype=torch.float64), scale=0.5)
    feats = [torch.randn(1, 4, 6, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    assert torch.autograd.gradgradcheck(lambda *xs: fuser(list(xs)), feats, eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("heads", [1, 3])
def test_non_finite_features_propagate_like_the_grid_sample_oracle(heads, bad):
    # Odd head counts crashed with an index error when a sampling location became NaN.
    fuser = perturbed(MMFuser(6, num_levels=2, heads=heads, points=2, dtype=torch.float64))
    values = [torch.randn(2, 12, 6, dtype=torch.float64) for _ in range(2)]
    query = torch.randn(2, 12, 6, dtype=torch.float64)
    query[1, 5, 2] = bad
    out = fuser([*values, query], grid=(3, 4))
    with torch.no_grad():
        expected = oracle_mmfuser(fuser, values, query, (3, 4), [(3, 4)] * 2)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert out[1, 5].isnan().all()
    assert torch.isfinite(out[0]).all()


def test_save_and_load_round_trip(tmp_path):
    fuser = perturbed(MMFuser(16, num_levels=2, heads=2, points=3, query_index=0, grid=(2, 5), eps=1e-5))
    module = PipelineFusionProjector(fuser, Projector("mlp2x_gelu", 16, 24), layers=[-2, -22, -12])
    module.save_pretrained(tmp_path / "mm")
    loaded = PipelineFusionProjector.from_pretrained(tmp_path / "mm")
    assert loaded.fuser.get_config() == fuser.get_config()
    feats = [torch.randn(2, 10, 16) for _ in range(3)]
    torch.testing.assert_close(loaded(feats), module(feats), rtol=0, atol=0)
    fuser.save_pretrained(tmp_path / "fuser")
    again = MMFuser.from_pretrained(tmp_path / "fuser", dtype=torch.float64)
    assert again.gamma1.dtype == torch.float64
    assert again.grid == (2, 5)
    assert again.query_index == 0


def test_config_and_repr():
    fuser = MMFuser(32, num_levels=2, heads=4, points=3, grid=(4, 6))
    assert fuser.in_dims == (32, 32, 32)
    assert fuser.out_dim == 32
    assert fuser.get_config() == {"dim": 32, "num_levels": 2, "heads": 4, "points": 3, "query_index": -1,
                                  "grid": [4, 6], "eps": 1e-6, "layer_scale_init": 0.0, "backend": "auto"}
    assert fuser.extra_repr().startswith("dim=32, num_levels=2, heads=4, points=3, query_index=-1, grid=(4, 6)")
    ls = MMFuser(32, num_levels=1, heads=4, layer_scale_init=0.1)
    assert torch.equal(ls.gamma2, torch.full((32,), 0.1))


def test_bad_inputs():
    fuser = MMFuser(16, num_levels=2, heads=2, points=2)
    feats = [torch.randn(2, 6, 16) for _ in range(3)]
    where = r"MMFuser\.forward"
    with pytest.raises(ValueError, match=where + r": features expected 3 tensors, got 2"):
        fuser(feats[:2], grid=(2, 3))
    with pytest.raises(ValueError, match=where + r": features\[1\] expected shape \(B, N, 16\), got \(2, 6, 8\)"):
        fuser([feats[0], torch.randn(2, 6, 8), feats[2]], grid=(2, 3))
    with pytest.raises(ValueError, match=where + r": features\[2\] \(query\): cannot tell the patch grid of 6 tokens"):
        fuser(feats)
    cls = [torch.randn(2, 7, 16) for _ in range(3)]
    with pytest.raises(ValueError, match=r"grid is \(2, 3\) = 6 tokens but the input has 7 tokens; drop prefix"):
        fuser(cls, grid=(2, 3))
    with pytest.raises(ValueError, match=r"features\.grid \(from the tap\) is \(2, 3\) = 6 tokens but the input has 7"):
        fuser(LayerFeatures(cls, grid=(2, 3), num_prefix_tokens=1))
    with pytest.raises(ValueError, match=where + r": level_grids expected 2 \(H, W\) pairs, one per key/value level, got 1"):
        fuser(feats, grid=(2, 3), level_grids=[(2, 3)])
    with pytest.raises(ValueError, match=where + r": level grid \(1, 3\) = 3 tokens does not fit features\[1\] with 6"):
        fuser(feats, grid=(2, 3), level_grids=[(2, 3), (1, 3)])
    with pytest.raises(TypeError, match=where + r": features\[0\] has dtype torch.float64 but the module's parameters"):
        fuser([f.double() for f in feats], grid=(2, 3))
    with pytest.raises(TypeError, match=where + r": features expected a sequence"):
        fuser(torch.stack(feats), grid=(2, 3))
    with pytest.raises(ValueError, match=r"MMFuser: query_index expected a position among the 3 inputs"):
        MMFuser(16, num_levels=2, heads=2, query_index=3)
    with pytest.raises(ValueError, match=r"MMFuser: dim=16 expected a multiple of heads=3"):
        MMFuser(16, heads=3)
    with pytest.raises(TypeError, match=r"MMFuser: grid expected a pair of ints"):
        MMFuser(16, heads=2, grid=24)


def test_direction_grid_offsets_reach_the_authors_pixels():
    fuser = MMFuser(64, num_levels=4, heads=16, points=4)
    bias = fuser.cross_attn.sampling_offsets.bias.view(16, 4, 4, 2)
    torch.testing.assert_close(bias[1, 2, 0], torch.tensor([1.0, math.tan(math.pi / 8)]))
    assert fuser.self_attn.sampling_offsets.bias.shape == (16 * 4 * 2,)


@pytest.mark.cuda
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cuda_backends_agree(dtype, tol):
    ref = with_small_offset_weights(
        perturbed(MMFuser(64, num_levels=4, heads=4, points=4, grid=(6, 7), backend="pytorch"))
    )
    fast = MMFuser(64, num_levels=4, heads=4, points=4, grid=(6, 7), backend="triton")
    fast.load_state_dict(ref.state_dict())
    ref, fast = ref.to("cuda", dtype), fast.to("cuda", dtype)
    feats = [torch.randn(3, 42, 64, device="cuda", dtype=dtype) for _ in range(5)]
    leaves_ref = [f.clone().requires_grad_() for f in feats]
    leaves_fast = [f.clone().requires_grad_() for f in feats]
    expected, out = ref(leaves_ref), fast(leaves_fast)
    expected.float().square().sum().backward()
    out.float().square().sum().backward()
    scale = expected.float().abs().max().item()
    torch.testing.assert_close(out.float(), expected.float(), atol=tol * scale, rtol=0)
    for a, b in zip(leaves_fast, leaves_ref):
        torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=tol * b.grad.float().abs().max().item(), rtol=0)
