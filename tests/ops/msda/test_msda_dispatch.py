"""Backend selection and input validation of ms_deform_attn: every error names what came in."""

from __future__ import annotations

import pytest
import torch

from layerfuse.ops import ms_deform_attn
from layerfuse.ops.msda import (
    MSDABackend,
    MSDAInputs,
    backend_names,
    get_backend,
    register_backend,
    select_backend,
    unregister_backend,
)
from layerfuse.ops.msda.reference import ms_deform_attn_pytorch
from msda_utils import make_inputs

SHAPES = [(2, 3), (1, 2)]


def _inputs(**kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return make_inputs(SHAPES, requires_grad=False, **kwargs)


def test_registry_holds_pytorch_and_triton():
    assert backend_names()[:2] == ("pytorch", "triton")


def test_auto_on_cpu_picks_pytorch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    value, loc, attn = _inputs()
    assert select_backend(MSDAInputs(value, tuple(SHAPES), loc, attn)).name == "pytorch"


def test_explicit_triton_on_cpu_lists_reasons(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    value, loc, attn = _inputs()
    with pytest.raises(ValueError, match=r"backend='triton' cannot run these inputs: device=cpu \(supported: cuda; "
                       r"cpu only under the Triton interpreter, TRITON_INTERPRET=1\)\. Inputs: value=\(2, 8, 2, 3\)"):
        ms_deform_attn(value, SHAPES, loc, attn, backend="triton")


def test_unknown_backend():
    value, loc, attn = _inputs()
    with pytest.raises(ValueError, match=r"backend expected one of 'auto', 'pytorch', 'triton'.*got 'cuda_op'"):
        ms_deform_attn(value, SHAPES, loc, attn, backend="cuda_op")


def test_registered_backend_is_selectable_and_its_reasons_are_reported():
    class HalfOnly(MSDABackend):
        name = "test_half_only"
        SUPPORTED_DEVICES = frozenset({"cpu"})
        SUPPORTED_DTYPES = frozenset({torch.float16})

        def apply(self, inputs):
            return ms_deform_attn_pytorch(
                inputs.value, inputs.spatial_shapes, inputs.sampling_locations, inputs.attention_weights
            )

    register_backend(HalfOnly())
    try:
        value, loc, attn = _inputs()
        with pytest.raises(ValueError, match=r"dtype=float64 \(supported: float16\)"):
            ms_deform_attn(value, SHAPES, loc, attn, backend="test_half_only")
        out = ms_deform_attn(value.half(), SHAPES, loc.half(), attn.half(), backend="test_half_only")
        assert out.dtype == torch.float16
        with pytest.raises(ValueError, match="already registered"):
            register_backend(HalfOnly())
        with pytest.raises(TypeError, match="expected a MSDABackend, got str"):
            register_backend("pytorch")
    finally:
        unregister_backend("test_half_only")
    assert "test_half_only" not in backend_names()


@pytest.mark.parametrize("name", ["pytorch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_backends_declared_for_cpu_run_every_declared_dtype(name, dtype):
    backend = get_backend(name)
    value, loc, attn = (t.to(dtype) for t in _inputs())
    inputs = MSDAInputs(value, tuple(SHAPES), loc, attn)
    assert backend.not_supported_reasons(inputs) == []
    out = backend.apply(inputs)
    assert out.shape == (2, 5, 6)
    assert out.dtype == dtype


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"value": torch.zeros(2, 8, 2)}, ValueError, r"value expected 4 dims \(B, S, M, D\); got value=\(2, 8, 2\)"),
        ({"value": torch.zeros(2, 9, 2, 3)}, ValueError, r"value has S=9 rows but spatial_shapes cover sum\(H\*W\)=8"),
        ({"value": torch.zeros(3, 8, 2, 3)}, ValueError, r"sampling_locations batch 2 != value batch 3"),
        ({"value": torch.zeros(2, 8, 4, 3)}, ValueError, r"sampling_locations heads 2 != value heads 4"),
        ({"value": torch.zeros(2, 8, 2, 3, dtype=torch.int64)}, TypeError, r"value expected a floating-point tensor"),
        ({"value": [1.0]}, TypeError, r"value expected a Tensor, got list"),
        ({"loc": torch.zeros(2, 5, 2, 2, 2, 3)}, ValueError, r"sampling_locations expected shape \(B, Nq, M, L, P, 2\)"),
        ({"loc": torch.zeros(2, 5, 2, 3, 2, 2)}, ValueError, r"sampling_locations has 3 levels but spatial_shapes has 2"),
        ({"attn": torch.zeros(2, 5, 2, 2, 3)}, ValueError,
         r"attention_weights expected shape \(2, 5, 2, 2, 2\).*attention_weights=\(2, 5, 2, 2, 3\)"),
        ({"shapes": [(2, 3), (1, 2, 1)]}, TypeError, r"spatial_shapes\[1\] expected an \(H, W\) pair of ints"),
        ({"shapes": [(2, 3), (0, 2)]}, ValueError, r"spatial_shapes\[1\] expected positive \(H, W\), got \(0, 2\)"),
        ({"shapes": [(2, 3.0)]}, TypeError, r"spatial_shapes\[0\] expected an \(H, W\) pair of ints, got \(2, 3.0\)"),
        ({"shapes": []}, ValueError, r"spatial_shapes expected at least one level"),
        ({"shapes": "2x3"}, TypeError, r"spatial_shapes expected a sequence"),
        ({"shapes": torch.tensor([[2.0, 3.0]])}, TypeError, r"spatial_shapes expected an integer tensor"),
        ({"shapes": torch.tensor([2, 3])}, ValueError, r"spatial_shapes expected an \(L, 2\) tensor.*got shape \(2,\)"),
    ],
)
def test_bad_inputs_raise_with_every_shape(change, error, match):
    value, loc, attn = (t.float() for t in _inputs())
    args = {"value": value, "shapes": SHAPES, "loc": loc, "attn": attn, **change}
    with pytest.raises(error, match=f"ms_deform_attn: {match}"):
        ms_deform_attn(args["value"], args["shapes"], args["loc"], args["attn"])


def test_devices_must_match():
    value, loc, attn = _inputs()
    with pytest.raises(ValueError, match=r"all tensors must be on one device, got \{'value': device\(type='meta'\)"):
        ms_deform_attn(value.to("meta"), SHAPES, loc, attn)
