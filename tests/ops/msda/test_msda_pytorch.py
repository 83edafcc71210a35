"""The pure-PyTorch path: equals the grid_sample definition, gradients, dtypes, torch.compile."""

from __future__ import annotations

import pytest
import torch

from layerfuse.ops import ms_deform_attn
from layerfuse.ops.msda.reference import DeformableSampling
from msda_utils import border_locations, grid_sample_oracle, make_inputs, second_derivative_case

# The backward's dot products with value rows take the sparse sampled product unless a query's
# L·P·4 corners outnumber the table's B·S·M rows ("one_pixel"), or under torch.compile; the oracle
# and gradcheck tests meet both paths.
SHAPES = {
    "one_level": [(4, 4)],
    "vit_levels": [(4, 4)] * 3,
    "mixed": [(3, 5), (1, 1), (2, 7), (5, 2)],
    "one_pixel": [(1, 1)],
}

# (dtype, atol, rtol) of the output and gradients against float64 on the same rounded inputs: one
# rounding of the float32 accumulator to the output dtype, plus the rounding of the gradients.
DTYPE_TOLERANCES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 2e-3, 2e-3),
    (torch.bfloat16, 1.6e-2, 1.6e-2),
]


def _grads(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(out, inputs, grad)


@pytest.mark.parametrize("name", list(SHAPES))
def test_matches_grid_sample_definition_in_float64(name):
    shapes = SHAPES[name]
    value, loc, attn = make_inputs(shapes, points=3)
    out = ms_deform_attn(value, shapes, loc, attn, backend="pytorch")
    expected = grid_sample_oracle(value, shapes, loc, attn)
    torch.testing.assert_close(out, expected, atol=1e-13, rtol=1e-13)
    grad = torch.randn_like(out)
    for got, want in zip(_grads(out, (value, loc, attn), grad), _grads(expected, (value, loc, attn), grad)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_borders_and_outside_match_grid_sample_exactly():
    shapes = [(2, 4), (4, 8), (1, 1)]
    loc = border_locations(shapes, batch=2, heads=2, points=2).requires_grad_()
    value, _, attn = make_inputs(shapes, queries=loc.shape[1], points=2)
    out = ms_deform_attn(value, shapes, loc, attn, backend="pytorch")
    expected = grid_sample_oracle(value, shapes, loc, attn)
    torch.testing.assert_close(out, expected, atol=1e-14, rtol=1e-14)
    grad = torch.randn_like(out)
    for got, want in zip(_grads(out, (value, loc, attn), grad), _grads(expected, (value, loc, attn), grad)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_far_outside_samples_zero_and_has_zero_gradient():
    shapes = [(3, 3)]
    value, loc, attn = make_inputs(shapes)
    far = torch.tensor([-1e30, 5.0], dtype=torch.float64).expand_as(loc).clone().requires_grad_()
    out = ms_deform_attn(value, shapes, far, attn, backend="pytorch")
    assert torch.equal(out, torch.zeros_like(out))
    grads = _grads(out, (value, far, attn), torch.ones_like(out))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_gradcheck_float64():
    shapes = [(3, 4), (2, 2)]
    value, loc, attn = make_inputs(shapes, batch=1, queries=3, heads=2, head_dim=2, points=2)
    assert torch.autograd.gradcheck(
        lambda v, lc, a: ms_deform_attn(v, shapes, lc, a, backend="pytorch"), (value, loc, attn)
    )


def test_autograd_function_gradcheck_float64_on_table_rows():
    shapes = ((2, 3),)
    value, loc, attn = make_inputs(list(shapes), batch=2, queries=2, heads=1, head_dim=2, points=2)
    table = value.reshape(-1, 2)
    assert torch.autograd.gradcheck(lambda t, lc, a: DeformableSampling.apply(t, lc, a, shapes, 6), (table, loc, attn))


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPE_TOLERANCES)
def test_low_precision_accumulates_in_float32(dtype, atol, rtol):
    shapes = SHAPES["mixed"]
    inputs = [t.detach().to(dtype).requires_grad_() for t in make_inputs(shapes, head_dim=8, points=4)]
    exact = [t.detach().double().requires_grad_() for t in inputs]
    out = ms_deform_attn(*inputs[:1], shapes, *inputs[1:], backend="pytorch")
    assert out.dtype == dtype
    expected = ms_deform_attn(*exact[:1], shapes, *exact[1:], backend="pytorch")
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)
    grad = torch.randn_like(expected)
    got = _grads(out, tuple(inputs), grad.to(dtype))
    want = _grads(expected, tuple(exact), grad.to(dtype).double())
    for g, w, t in zip(got, want, inputs):
        assert g.dtype == t.dtype
        torch.testing.assert_close(g.double(), w, atol=atol * 4, rtol=rtol * 4)


def test_mixed_input_dtypes_return_value_dtype():
    shapes = [(2, 3)]
    value, loc, attn = make_inputs(shapes, requires_grad=False)
    out = ms_deform_attn(value.bfloat16(), shapes, loc.float(), attn.half())
    assert out.dtype == torch.bfloat16


def test_spatial_shapes_tensor_equals_python_ints():
    shapes = SHAPES["mixed"]
    value, loc, attn = make_inputs(shapes, requires_grad=False)
    from_tensor = ms_deform_attn(value, torch.tensor(shapes), loc, attn)
    torch.testing.assert_close(from_tensor, ms_deform_attn(value, shapes, loc, attn), atol=0, rtol=0)


def test_compiles_fullgraph_with_gradients():
    shapes = [(3, 5), (2, 2)]
    value, loc, attn = make_inputs(shapes, dtype=torch.float32)
    compiled = torch.compile(
        lambda v, lc, a: ms_deform_attn(v, shapes, lc, a, backend="pytorch"), fullgraph=True, backend="aot_eager"
    )
    out = compiled(value, loc, attn)
    expected = ms_deform_attn(value, shapes, loc, attn, backend="pytorch")
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    for got, want in zip(_grads(out, (value, loc, attn), grad), _grads(expected, (value, loc, attn), grad)):
        torch.testing.assert_close(got, want)


def test_autocast_keeps_float32_sampling():
    shapes = [(3, 3)]
    value, loc, attn = make_inputs(shapes, dtype=torch.float32, requires_grad=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ms_deform_attn(value, shapes, loc, attn)
    torch.testing.assert_close(out, ms_deform_attn(value, shapes, loc, attn), atol=0, rtol=0)


def _closed_form_penalty(loc: torch.Tensor, attn: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """||d(out²)/d value||² of one sample inside one 2x2 level, written out: 4·out²·a²·Σ_k w_k²."""
    u, v = loc[0] * 2 - 0.5, loc[1] * 2 - 0.5  # pixel coordinates; floor is (0, 0) in the test below
    w = torch.stack([(1 - u) * (1 - v), u * (1 - v), (1 - u) * v, u * v])  # row-major corners
    out = attn * (w * value).sum()
    return 4 * out**2 * attn**2 * (w**2).sum()


def test_second_derivatives_match_closed_form_and_central_differences():
    value, loc, attn, expected = second_derivative_case()
    out = ms_deform_attn(value, [(2, 2)], loc, attn, backend="pytorch")
    (grad_value,) = torch.autograd.grad(out.square().sum(), value, create_graph=True)
    got = torch.autograd.grad(grad_value.square().sum(), (loc, attn))
    for g, want in zip(got, expected):
        torch.testing.assert_close(g.flatten(), want, atol=1e-5, rtol=0)

    # The same numbers from the closed form, by autograd and by central differences.
    x = torch.cat([loc.detach().flatten(), attn.detach().flatten()]).requires_grad_()
    penalty = lambda x: _closed_form_penalty(x[:2], x[2], value.detach().flatten())  # noqa: E731
    (closed,) = torch.autograd.grad(penalty(x), x)
    h = 1e-6
    central = torch.stack([(penalty(x.detach() + h * e) - penalty(x.detach() - h * e)) / (2 * h)
                           for e in torch.eye(3, dtype=torch.float64)])
    torch.testing.assert_close(torch.cat([g.flatten() for g in got]), closed, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(central, closed, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("name", ["mixed", "one_pixel"])
def test_gradgradcheck_float64(name):
    shapes = SHAPES[name]
    value, loc, attn = make_inputs(shapes, batch=1, queries=3, heads=2, head_dim=2, points=2)
    fn = lambda v, lc, a: ms_deform_attn(v, shapes, lc, a, backend="pytorch")  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (value, loc, attn))
    # Only some inputs differentiable: the double-backward route must skip the others.
    assert torch.autograd.gradgradcheck(lambda lc: fn(value.detach(), lc, attn.detach()), (loc,))
    assert torch.autograd.gradgradcheck(lambda v, a: fn(v, loc.detach(), a), (value, attn))


def test_autograd_function_gradgradcheck_float64_on_table_rows():
    shapes = ((2, 3),)
    value, loc, attn = make_inputs(list(shapes), batch=2, queries=2, heads=1, head_dim=2, points=2)
    table = value.reshape(-1, 2)
    assert torch.autograd.gradgradcheck(
        lambda t, lc, a: DeformableSampling.apply(t, lc, a, shapes, 6), (table, loc, attn)
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("heads", [1, 2, 3])
def test_non_finite_locations_propagate_like_grid_sample(heads, bad):
    shapes = SHAPES["mixed"]
    value, loc, attn = make_inputs(shapes, heads=heads, points=2)
    loc = loc.detach().clone()
    loc[1, 3, heads - 1, 2, 1, heads % 2] = bad
    loc.requires_grad_()
    out = ms_deform_attn(value, shapes, loc, attn, backend="pytorch")
    expected = grid_sample_oracle(value, shapes, loc, attn)
    torch.testing.assert_close(out, expected, atol=1e-13, rtol=1e-13, equal_nan=True)
    nan_channels = out.isnan().nonzero().tolist()
    head_dim = value.shape[-1]
    assert nan_channels == [[1, 3, (heads - 1) * head_dim + i] for i in range(head_dim)]
    grad = torch.randn_like(out)
    got = _grads(out, (value, loc, attn), grad)
    want = _grads(expected, (value, loc, attn), grad)
    # The value gradient gets nothing from the sample, as in grid_sample; its own location and
    # weight gradients are NaN; every other entry is finite and equal to the oracle's.
    torch.testing.assert_close(got[0], want[0], atol=1e-12, rtol=1e-12)
    bad_sample = (1, 3, heads - 1, 2, 1)
    assert got[1][bad_sample].isnan().all()
    assert got[2][bad_sample].isnan()
    for g, w in zip(got[1:], want[1:]):
        keep = torch.ones(g.shape, dtype=torch.bool)
        keep[bad_sample] = False
        torch.testing.assert_close(g[keep], w[keep], atol=1e-12, rtol=1e-12)


def test_nan_value_and_weight_propagate():
    shapes = [(3, 4)]
    value, loc, attn = make_inputs(shapes, heads=3, requires_grad=False)
    value[0, :, 1] = float("nan")
    attn[1, 2, 0, 0, 0] = float("nan")
    out = ms_deform_attn(value, shapes, loc, attn, backend="pytorch")
    torch.testing.assert_close(out, grid_sample_oracle(value, shapes, loc, attn), equal_nan=True)
    assert out[0, :, 3:6].isnan().all()
    assert out[1, 2, :3].isnan().all()


@pytest.mark.parametrize("width", [5, 7, 24])
def test_location_gradient_at_pixel_centres_is_a_one_sided_derivative(width):
    # At a pixel centre the interpolant has a kink; the gradient is the left or right derivative,
    # depending on which side the rounded pixel coordinate falls (grid_sample's may differ from ours).
    value = torch.randn(1, width, 1, 1, dtype=torch.float64)
    xs = (torch.arange(width, dtype=torch.float64) + 0.5) / width
    loc = torch.stack([xs, torch.full_like(xs, 0.5)], -1).view(1, width, 1, 1, 1, 2).requires_grad_()
    attn = torch.ones(1, width, 1, 1, 1, dtype=torch.float64)
    for out in (ms_deform_attn(value, [(1, width)], loc, attn, backend="pytorch"),
                grid_sample_oracle(value, [(1, width)], loc, attn)):
        (grad,) = torch.autograd.grad(out.sum(), loc)
        padded = torch.cat([value.new_zeros(1), value.flatten(), value.new_zeros(1)])  # zeros outside
        left, right = (padded[1:-1] - padded[:-2]) * width, (padded[2:] - padded[1:-1]) * width
        dx = grad[0, :, 0, 0, 0, 0]
        assert torch.all(torch.isclose(dx, left, atol=1e-9) | torch.isclose(dx, right, atol=1e-9))
        torch.testing.assert_close(out.flatten(), value.flatten(), atol=1e-13, rtol=0)
