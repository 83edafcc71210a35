"""The pure-PyTorch path: equals the grid_sample definition, gradients, dtypes, torch.compile."""

from __future__ import annotations

import pytest
import torch

from layerfuse.ops import ms_deform_attn
from layerfuse.ops.msda.reference import DeformableSampling
from msda_utils import border_locations, grid_sample_oracle, make_inputs

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
