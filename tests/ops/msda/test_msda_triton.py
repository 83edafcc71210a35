"""Triton kernels against the PyTorch path: on the CPU through the interpreter, and on CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from layerfuse.ops import ms_deform_attn
from layerfuse.ops.msda import MSDAInputs, get_backend, select_backend
from layerfuse.ops.msda.triton_op import ms_deform_attn_backward, ms_deform_attn_forward
from msda_utils import border_locations, make_inputs

TRITON = get_backend("triton")
# (atol, rtol) of the Triton backend against float64 on the same rounded inputs.
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def test_interpreter_matches_pytorch_path():
    pytest.importorskip("triton")
    script = Path(__file__).with_name("msda_interpreter_checks.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == ["ok", "mixed", "levels", "float64", "ok", "borders", "float64",
                                     "ok", "bfloat16", "value", "ok", "non-finite", "ok", "empty",
                                     "ok", "double-backward", "ok", "opcheck"]


def _check_against_pytorch(shapes, value, loc, attn):
    atol, rtol = TOLERANCES[value.dtype]
    out = ms_deform_attn(value, shapes, loc, attn, backend="triton")
    exact = [t.detach().double().requires_grad_() for t in (value, loc, attn)]
    expected = ms_deform_attn(exact[0], shapes, exact[1], exact[2], backend="pytorch")
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (value, loc, attn), grad)
    want = torch.autograd.grad(expected, exact, grad.double())
    for g, w, t in zip(got, want, (value, loc, attn)):
        assert g.dtype == t.dtype
        torch.testing.assert_close(g.double(), w, atol=atol * 4, rtol=rtol * 4)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", sorted(TRITON.SUPPORTED_DTYPES, key=str))
@pytest.mark.parametrize("shapes", [[(24, 24)] * 4, [(3, 5), (1, 1), (7, 2), (13, 11)]])
def test_cuda_matches_pytorch_path(dtype, shapes):
    inputs = make_inputs(shapes, batch=3, queries=37, heads=4, head_dim=24, points=3, dtype=dtype)
    _check_against_pytorch(shapes, *(t.detach().cuda().requires_grad_() for t in inputs))


@pytest.mark.cuda
def test_cuda_borders_match_pytorch_path():
    shapes = [(2, 4), (8, 4), (1, 1)]
    loc = border_locations(shapes, batch=2, heads=2, points=2)
    value, _, attn = make_inputs(shapes, queries=loc.shape[1], heads=2, head_dim=8, points=2)
    _check_against_pytorch(shapes, *(t.detach().cuda().requires_grad_() for t in (value, loc, attn)))


@pytest.mark.cuda
def test_cuda_auto_picks_triton_and_opcheck_passes():
    shapes = [(3, 4), (2, 2)]
    value, loc, attn = (t.detach().cuda().float() for t in make_inputs(shapes, head_dim=8))
    assert select_backend(MSDAInputs(value, tuple(shapes), loc, attn)).name == "triton"
    flat = [3, 4, 2, 2]
    torch.library.opcheck(ms_deform_attn_forward, (value.requires_grad_(), flat, loc.requires_grad_(), attn))
    grad = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], device="cuda")
    torch.library.opcheck(ms_deform_attn_backward, (grad, value.detach(), flat, loc.detach(), attn))


@pytest.mark.cuda
def test_cuda_compiles_fullgraph():
    shapes = [(5, 6), (3, 3)]
    value, loc, attn = (t.detach().cuda().float().requires_grad_() for t in make_inputs(shapes, head_dim=16))
    compiled = torch.compile(lambda v, lc, a: ms_deform_attn(v, shapes, lc, a, backend="triton"), fullgraph=True)
    out = compiled(value, loc, attn)
    torch.testing.assert_close(out, ms_deform_attn(value, shapes, loc, attn, backend="pytorch"))
    out.sum().backward()
    assert all(t.grad is not None for t in (value, loc, attn))


def test_head_dim_limit_is_a_reason():
    value, loc, attn = make_inputs([(2, 2)], head_dim=300, requires_grad=False)
    reasons = TRITON.not_supported_reasons(MSDAInputs(value, ((2, 2),), loc, attn))
    assert "head dim D=300 (supported: D <= 256)" in reasons
