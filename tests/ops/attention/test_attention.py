"""attention(): every registered backend against a float64 reference, masks, fully masked rows, errors."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from layerfuse._optional import is_available
from layerfuse.ops.attention import (
    AttentionBackend,
    AttentionInputs,
    attention,
    auto_order,
    backend_names,
    get_backend,
    register_backend,
    select_backend,
    unregister_backend,
)

# (atol, rtol) per dtype, against a float64 reference computed from the same (rounded) inputs.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}
B, H, NQ, NK, D = 2, 3, 5, 7, 8
MASKS = ["none", "bool", "additive", "key_padding"]


def backend_cases() -> list:
    """(backend, device, dtype) from what each registered backend declares it supports."""
    cases = []
    for name in backend_names():
        backend = get_backend(name)
        devices = sorted(backend.SUPPORTED_DEVICES) if backend.SUPPORTED_DEVICES else ["cpu", "cuda"]
        for device in devices:
            for dtype in sorted(backend.SUPPORTED_DTYPES, key=str):
                marks = [pytest.mark.cuda] if device == "cuda" else []
                if name == "xformers":
                    marks.append(pytest.mark.skipif(not is_available("xformers"), reason="xformers not installed"))
                cases.append(pytest.param(name, device, dtype, marks=marks, id=f"{name}-{device}-{str(dtype)[6:]}"))
    return cases


def make_mask(kind: str, device: str, dtype: torch.dtype) -> torch.Tensor | None:
    g = torch.Generator().manual_seed(1)
    if kind == "none":
        return None
    if kind == "bool":
        mask = torch.rand(B, 1, NQ, NK, generator=g) > 0.4
        mask[:, :, :, 0] = True
        mask[1, 0, 2] = False  # one fully masked query row
        return mask.to(device)
    if kind == "key_padding":
        mask = torch.ones(B, 1, 1, NK, dtype=torch.bool)
        mask[0, ..., 5:] = False
        return mask.to(device)
    bias = torch.randn(NQ, NK, generator=g)
    bias[torch.rand(NQ, NK, generator=g) > 0.6] = float("-inf")
    bias[:, 1] = 0.5
    bias[3] = float("-inf")  # fully masked row
    return bias.to(device=device, dtype=dtype)


def reference(q, k, v, mask, scale=None):
    """Float64 attention written out row by row; fully masked rows give zeros."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if mask is not None and mask.dtype == torch.bool:
        scores = torch.where(mask.expand(scores.shape), scores, float("-inf"))
    elif mask is not None:
        scores = scores + mask.double()
    top = scores.amax(-1, keepdim=True)
    empty = torch.isinf(top)
    weights = torch.exp(scores - torch.where(empty, 0.0, top))
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-300)
    return torch.where(empty, 0.0, torch.einsum("bhqk,bhkd->bhqd", weights, v))


def inputs(device, dtype, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g).to(device, dtype) for n in (NQ, NK, NK))
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize(("name", "device", "dtype"), backend_cases())
def test_backend_matches_reference_forward_and_backward(name, device, dtype, mask_kind):
    q, k, v = inputs(device, dtype, requires_grad=True)
    mask = make_mask(mask_kind, device, dtype)
    out = attention(q, k, v, mask=mask, backend=name)
    assert out.dtype == dtype
    assert out.shape == (B, H, NQ, D)
    ref = reference(q, k, v, mask)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_grads = torch.autograd.grad(reference(*leaves, mask), leaves, grad_out.double())
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, atol=atol * 4, rtol=rtol * 4)


@pytest.mark.parametrize(("name", "device", "dtype"), backend_cases())
def test_fully_masked_rows_are_zero_with_zero_gradient(name, device, dtype):
    q, k, v = inputs(device, dtype, requires_grad=True)
    mask = torch.ones(1, 1, NQ, NK, dtype=torch.bool, device=device)
    mask[..., 1, :] = False
    out = attention(q, k, v, mask=mask, backend=name)
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    out[:, :, 1].sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q.grad))
    assert torch.equal(k.grad, torch.zeros_like(k.grad))
    assert torch.equal(v.grad, torch.zeros_like(v.grad))
    additive = torch.zeros(NQ, NK, device=device, dtype=dtype)
    additive[4] = float("-inf")
    out = attention(q.detach(), k.detach(), v.detach(), mask=additive, backend=name)
    assert torch.equal(out[:, :, 4], torch.zeros_like(out[:, :, 4]))
    assert torch.isfinite(out).all()


def test_custom_scale_and_value_width():
    q, k, _ = inputs("cpu", torch.float64)
    v = torch.randn(B, H, NK, 3, dtype=torch.float64)
    for name in ("sdpa", "eager"):
        out = attention(q, k, v, scale=0.3, backend=name)
        torch.testing.assert_close(out, reference(q, k, v, None, scale=0.3))


def test_dropout_drops_and_stays_finite():
    q, k, v = inputs("cpu", torch.float32)
    for name in ("sdpa", "eager"):
        out = attention(q, k, v, dropout_p=0.5, backend=name)
        assert torch.isfinite(out).all()
        assert not torch.allclose(out, attention(q, k, v, backend=name))


def test_auto_prefers_sdpa_on_cpu_and_lists_cuda_order():
    q, k, v = inputs("cpu", torch.float32)
    assert select_backend(AttentionInputs(q, k, v)).name == "sdpa"
    assert auto_order(torch.device("cpu")) == ["sdpa", "eager"]
    assert auto_order(torch.device("cuda")) == ["sdpa", "xformers", "eager"]


def test_explicit_backend_that_cannot_run_says_why():
    q, k, v = inputs("cpu", torch.float64)
    with pytest.raises(ValueError, match=r"backend='xformers' cannot run these inputs: .*device=cpu \(supported: cuda\)"):
        attention(q, k, v, backend="xformers")
    with pytest.raises(ValueError, match=r"dtype=float64 \(supported: bfloat16, float16, float32\)"):
        attention(q, k, v, backend="xformers")
    if not is_available("xformers"):
        with pytest.raises(ValueError, match=r"xformers is not installed \(pip install '\.\[xformers\]' in the layerfuse checkout"):
            attention(q, k, v, backend="xformers")


class _Doubling(AttentionBackend):
    """Test backend: the eager result times two, CPU float32 only, no masks."""

    name = "doubling"
    SUPPORTED_DEVICES = frozenset({"cpu"})
    SUPPORTED_DTYPES = frozenset({torch.float32})
    SUPPORTS_MASK = False

    def apply(self, inputs):
        return 2 * get_backend("eager").apply(inputs)


def test_registered_backend_is_used_by_auto_and_by_name_and_declines_with_reasons():
    register_backend(_Doubling(), auto_devices=("cpu",))
    try:
        q, k, v = inputs("cpu", torch.float32)
        torch.testing.assert_close(attention(q, k, v), 2 * attention(q, k, v, backend="eager"))
        torch.testing.assert_close(attention(q, k, v, backend="doubling"), 2 * attention(q, k, v, backend="eager"))
        mask = torch.ones(NQ, NK, dtype=torch.bool)
        torch.testing.assert_close(attention(q, k, v, mask=mask), attention(q, k, v, backend="sdpa"))
        with pytest.raises(ValueError, match=r"backend='doubling' cannot run .*mask=bool \(supported: none\)"):
            attention(q, k, v, mask=mask, backend="doubling")
        with pytest.raises(ValueError, match="already registered"):
            register_backend(_Doubling())
    finally:
        unregister_backend("doubling")
    assert "doubling" not in backend_names()
    assert auto_order(torch.device("cpu")) == ["sdpa", "eager"]


def test_auto_with_no_backend_left_lists_every_reason(monkeypatch):
    q, k, v = inputs("cpu", torch.float32)
    monkeypatch.setattr(get_backend("sdpa"), "SUPPORTED_DTYPES", frozenset({torch.float16}))
    monkeypatch.setattr(get_backend("eager"), "SUPPORTED_DEVICES", frozenset({"cuda"}))
    with pytest.raises(ValueError, match=r"no backend can run .*sdpa: dtype=float32 .*eager: device=cpu"):
        attention(q, k, v)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda q, k, v: (q, k, v, {"backend": "flash"}), ValueError, "backend expected one of 'auto', "),
        (lambda q, k, v: (q[0], k, v, {}), ValueError, r"expected 4-d tensors laid out \(B, heads, N, D\)"),
        (lambda q, k, v: (q, k[:1], v[:1], {}), ValueError, "must share the batch size B=2"),
        (lambda q, k, v: (q, k[:, :2], v, {}), ValueError, "must share the number of heads H=3"),
        (lambda q, k, v: (q, k[..., :4], v, {}), ValueError, "k expected head dim D=8"),
        (lambda q, k, v: (q, k, v[:, :, :3], {}), ValueError, r"v expected as many tokens as k \(Nk=7\)"),
        (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0], {}), ValueError, "at least one token"),
        (lambda q, k, v: (q, k.double(), v, {}), TypeError, "share one dtype, got q=float32, k=float64"),
        (lambda q, k, v: (q.int(), k, v, {}), TypeError, "q expected a floating-point tensor"),
        (lambda q, k, v: ([q], k, v, {}), TypeError, "q expected a torch.Tensor, got list"),
        (lambda q, k, v: (q, k, v, {"dropout_p": 1.0}), ValueError, r"dropout_p expected a float in \[0, 1\)"),
        (lambda q, k, v: (q, k, v, {"scale": float("nan")}), TypeError, "scale expected None or a finite float"),
        (lambda q, k, v: (q, k, v, {"mask": torch.ones(B, NQ, NK, dtype=torch.bool)}), ValueError,
         "a 3-d mask is ambiguous"),
        (lambda q, k, v: (q, k, v, {"mask": torch.ones(NQ, NK + 1, dtype=torch.bool)}), ValueError,
         r"mask expected shape \(Nq or 1, Nk or 1\) = \(5, 7\)"),
        (lambda q, k, v: (q, k, v, {"mask": torch.ones(B, 2, NQ, NK, dtype=torch.bool)}), ValueError,
         r"mask expected shape \(B or 1, H or 1, Nq or 1, Nk or 1\) = \(2, 3, 5, 7\)"),
        (lambda q, k, v: (q, k, v, {"mask": torch.ones(NQ, NK, dtype=torch.int64)}), TypeError,
         "mask expected dtype bool"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, error, message):
    q, k, v, kwargs = change(*inputs("cpu", torch.float32))
    with pytest.raises(error, match=message):
        attention(q, k, v, **kwargs)


def test_error_prints_every_shape():
    q, k, v = inputs("cpu", torch.float32)
    with pytest.raises(ValueError, match=r"q=\(2, 3, 5, 8\), k=\(2, 3, 7, 8\), v=\(2, 3, 3, 8\)"):
        attention(q, k, v[:, :, :3])


@pytest.mark.slow
def test_compiles_with_fullgraph_including_fully_masked_rows():
    q, k, v = inputs("cpu", torch.float32, requires_grad=True)
    mask = make_mask("bool", "cpu", torch.float32)
    expected = attention(q, k, v, mask=mask)
    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, mask=mask)
    out.sum().backward()
    torch.testing.assert_close(out, expected)
    assert torch.isfinite(q.grad).all()


def test_xformers_adapter_layout_and_bias_with_a_stand_in_kernel(monkeypatch):
    """The layout conversion and mask-to-bias code of the xformers backend, run on the CPU against a
    stand-in for ``memory_efficient_attention`` (the real kernel is covered by the CUDA cases)."""
    seen = {}

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):
        seen["bias"] = attn_bias
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # xformers is (B, M, H, K)
        return reference(q, k, v, attn_bias, scale).to(query.dtype).transpose(1, 2)

    fake_ops = types.ModuleType("xformers.ops")
    fake_ops.memory_efficient_attention = memory_efficient_attention
    fake = types.ModuleType("xformers")
    fake.ops = fake_ops
    monkeypatch.setitem(sys.modules, "xformers", fake)
    monkeypatch.setitem(sys.modules, "xformers.ops", fake_ops)
    q, k, v = inputs("cpu", torch.float32)
    mask = make_mask("bool", "cpu", torch.float32)
    mask[1, 0, 2, 0] = True  # the dispatcher's fully-masked-row handling is not under test here
    out = get_backend("xformers").apply(AttentionInputs(q, k, v, mask))
    torch.testing.assert_close(out.double(), reference(q, k, v, mask), atol=1e-5, rtol=1e-5)
    bias = seen["bias"]
    assert bias.shape == (B, H, NQ, NK)
    assert bias.stride(-2) % 8 == 0
    assert torch.equal(torch.isinf(bias), ~mask.expand(B, H, NQ, NK))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("mask_kind", ["none", "additive"])
@pytest.mark.parametrize(("name", "device", "dtype"), [*backend_cases(), pytest.param("auto", "cpu", torch.float32)])
def test_non_finite_query_row_gives_nan_on_every_backend(name, device, dtype, mask_kind, bad):
    # CPU flash SDPA, which "auto" picks on the CPU, returns 0 for a NaN query row by itself.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for n in (NQ, NK, NK))
    q[1, 2, 2, 4] = bad  # row 3 is the fully masked row of the additive mask
    mask = make_mask(mask_kind, "cpu", torch.float64)
    expected = attention(q, k, v, mask=mask, backend="eager")
    q, k, v = (t.to(device, dtype) for t in (q, k, v))
    out = attention(q, k, v, mask=None if mask is None else mask.to(device, dtype), backend=name).cpu()
    assert torch.equal(out.isnan(), expected.isnan())
    assert out[1, 2, 2].isnan().all()
    assert torch.isfinite(out[~out.isnan()]).all()
    assert out.isnan().sum() == D


@pytest.mark.parametrize("name", ["sdpa", "eager"])
def test_non_finite_query_in_windowed_attention_gives_nan(name):
    from layerfuse.ops.attention.window import windowed_attention

    q, k = torch.randn(1, 2, 12, 4), torch.randn(1, 2, 12, 4)
    q[0, 1, 5, 0] = float("nan")
    out = windowed_attention(q, k, k, query_grid=(3, 4), key_grids=[(3, 4)], window=2, backend=name)
    assert out.isnan().nonzero()[:, :3].unique(dim=0).tolist() == [[0, 1, 5]]
