"""Triton kernels vs the PyTorch path on the CPU, through the Triton interpreter.

Run by ``test_msda_triton.py`` in a fresh interpreter with ``TRITON_INTERPRET=1`` in the environment
(Triton reads it when first imported, so it cannot be switched on inside a running test session).
Each check raises on a mismatch; the script exits non-zero with the failing comparison.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for msda_utils

from layerfuse.ops import ms_deform_attn
from layerfuse.ops.msda.triton_op import ms_deform_attn_backward, ms_deform_attn_forward
from msda_utils import border_locations, grid_sample_oracle, make_inputs, second_derivative_case


def compare(name, shapes, value, loc, attn, *, atol, rtol):
    out = ms_deform_attn(value, shapes, loc, attn, backend="triton")
    exact = [t.detach().double().requires_grad_() for t in (value, loc, attn)]
    expected = ms_deform_attn(exact[0], shapes, exact[1], exact[2], backend="pytorch")
    assert out.dtype == value.dtype, f"{name}: output dtype {out.dtype} != {value.dtype}"
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol, msg=lambda m: f"{name} forward: {m}")
    grad = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, (value, loc, attn), grad.to(out.dtype))
    want = torch.autograd.grad(expected, exact, grad.to(out.dtype).double())
    for arg, g, w, t in zip(("value", "sampling_locations", "attention_weights"), got, want, (value, loc, attn)):
        assert g.dtype == t.dtype, f"{name}: grad {arg} dtype {g.dtype} != {t.dtype}"
        torch.testing.assert_close(g.double(), w, atol=atol, rtol=rtol, msg=lambda m, a=arg: f"{name} grad {a}: {m}")
    print(f"ok {name}")


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("set TRITON_INTERPRET=1 before running this script")
    torch.manual_seed(0)

    # Non-square grids, a 1x1 level, prime sides, odd head dim, locations up to 0.3 outside.
    shapes = [(3, 5), (1, 1), (2, 7)]
    compare("mixed levels float64", shapes, *make_inputs(shapes, batch=2, queries=5, heads=2, head_dim=3, points=2),
            atol=1e-12, rtol=1e-12)

    # Exactly on pixel centres, map edges and one pixel outside.
    shapes = [(2, 4), (1, 1)]
    loc = border_locations(shapes, batch=1, heads=1, points=1).requires_grad_()
    value, _, attn = make_inputs(shapes, batch=1, queries=loc.shape[1], heads=1, head_dim=2, points=1)
    compare("borders float64", shapes, value, loc, attn, atol=1e-12, rtol=1e-12)

    # The MMFuser mix: bfloat16 value, float32 locations and weights; float32 accumulation.
    shapes = [(3, 3), (2, 3)]
    value, loc, attn = make_inputs(shapes, batch=1, queries=4, heads=2, head_dim=4, points=2, requires_grad=False)
    compare("bfloat16 value", shapes, value.bfloat16().requires_grad_(), loc.float().requires_grad_(),
            attn.float().requires_grad_(), atol=1.6e-2, rtol=1.6e-2)

    # NaN and infinite locations give NaN exactly where grid_sample does, with odd head counts too.
    shapes = [(3, 5), (2, 2)]
    for heads in (1, 3):
        for bad in (float("nan"), float("inf"), -float("inf")):
            value, loc, attn = make_inputs(shapes, batch=2, queries=3, heads=heads, head_dim=2, points=2)
            loc = loc.detach().clone()
            loc[0, 1, heads - 1, 1, 0, 0] = bad
            out = ms_deform_attn(value, shapes, loc, attn, backend="triton")
            expected = grid_sample_oracle(value, shapes, loc, attn)
            torch.testing.assert_close(out, expected, equal_nan=True, atol=1e-12, rtol=1e-12)
            assert out.isnan().sum() == 2, f"non-finite location {bad}, heads={heads}: {out}"
            grads = torch.autograd.grad(out.nan_to_num().sum(), (value, attn))
            assert torch.isfinite(grads[0]).all(), "a non-finite location must not reach the value gradient"
            assert grads[1].isnan().sum() == 1
    print("ok non-finite")

    # Empty batch and no queries.
    for batch, queries in ((0, 3), (2, 0)):
        value, loc, attn = make_inputs(shapes, batch=batch, queries=queries, heads=3)
        out = ms_deform_attn(value, shapes, loc, attn, backend="triton")
        assert out.shape == (batch, queries, 9), out.shape
        grads = torch.autograd.grad(out.sum(), (value, loc, attn))
        assert [g.shape for g in grads] == [value.shape, loc.shape, attn.shape]
    print("ok empty")

    # Second derivatives: the closed-form case, and gradgradcheck.
    value, loc, attn, expected = second_derivative_case()
    out = ms_deform_attn(value, [(2, 2)], loc, attn, backend="triton")
    (grad_value,) = torch.autograd.grad(out.square().sum(), value, create_graph=True)
    got = torch.autograd.grad(grad_value.square().sum(), (loc, attn))
    for g, want in zip(got, expected):
        torch.testing.assert_close(g.flatten(), want, atol=1e-5, rtol=0)
    value, loc, attn = make_inputs([(3, 4), (2, 2)], batch=1, queries=3, heads=2, head_dim=2, points=2)
    assert torch.autograd.gradgradcheck(
        lambda v, lc, a: ms_deform_attn(v, [(3, 4), (2, 2)], lc, a, backend="triton"), (value, loc, attn)
    )
    print("ok double-backward")

    # The ops themselves: schema, fake kernels, autograd registration. AOT dispatch is left to the
    # CUDA tests: there the kernel would be handed functional wrapper tensors, whose storage the
    # interpreter cannot copy to the host.
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    shapes = [(2, 3)]
    value, loc, attn = make_inputs(shapes, batch=1, queries=2, heads=1, head_dim=2, points=1, dtype=torch.float32)
    flat = [2, 3]
    torch.library.opcheck(ms_deform_attn_forward, (value, flat, loc, attn), test_utils=checks)
    grad = torch.randn(1, 2, 2)
    torch.library.opcheck(
        ms_deform_attn_backward, (grad, value.detach(), flat, loc.detach(), attn.detach()), test_utils=checks
    )
    print("ok opcheck")


if __name__ == "__main__":
    main()
