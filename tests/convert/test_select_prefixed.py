import pytest
import torch

from layerfuse.convert import select_prefixed, target_dtype
from layerfuse.convert.state_dict import llava_projector_shape

T = torch.zeros(1)


def test_any_prefix_and_siblings_never_match():
    sd = {
        "model.mm_projector.0.weight": T,
        "mm_projector_f.0.weight": T,
        "model.mm_projectors.1.0.weight": T,
        "model.mm_projector_aux_0.weight": T,
        "model.layers.0.mlp.weight": T,
    }
    assert list(select_prefixed(sd, "mm_projector", where="t")) == ["0.weight"]
    assert list(select_prefixed(sd, "mm_projector_f", where="t")) == ["0.weight"]
    lora = {"base_model.model.model.mm_projector.2.bias": T}
    assert list(select_prefixed(lora, "mm_projector", where="t")) == ["2.bias"]
    bare = {"mm_projector.0.weight": T}
    assert list(select_prefixed(bare, "mm_projector", where="t")) == ["0.weight"]


def test_numbered_siblings():
    sd = {f"model.mm_projectors.{i}.0.weight": torch.full((1,), float(i)) for i in (1, 10, 11, 2)}
    one = select_prefixed(sd, "mm_projectors.1", where="t")
    assert list(one) == ["0.weight"]
    assert one["0.weight"].item() == 1.0
    assert select_prefixed(sd, "mm_projectors.10", where="t")["0.weight"].item() == 10.0


def test_no_partial_component_match():
    assert select_prefixed({"model.xmm_projector.0.weight": T}, "mm_projector", where="t") == {}
    assert select_prefixed({"model.mm_projector": T}, "mm_projector", where="t") == {}


def test_strips_at_first_anchor_only():
    sd = {"model.mm_projector.fusion.mm_projector.0.weight": T}
    assert list(select_prefixed(sd, "mm_projector", where="t")) == ["fusion.mm_projector.0.weight"]


def test_collision_and_non_tensor():
    sd = {"a.mm_projector.0.weight": T, "b.mm_projector.0.weight": T}
    with pytest.raises(ValueError, match=r"t: checkpoint keys 'a.mm_projector.0.weight' and 'b.mm_projector.0.weight' both map"):
        select_prefixed(sd, "mm_projector", where="t")
    with pytest.raises(TypeError, match=r"checkpoint entry 'mm_projector.step' expected a tensor, got int"):
        select_prefixed({"mm_projector.step": 3}, "mm_projector", where="t")


def test_target_dtype():
    assert target_dtype({"a": torch.zeros(1, dtype=torch.bfloat16)}, None, where="t") == torch.float32
    assert target_dtype({"a": torch.zeros(1, dtype=torch.float16)}, None, where="t") == torch.float32
    assert target_dtype({"a": torch.zeros(1, dtype=torch.float64)}, None, where="t") == torch.float64
    assert target_dtype({"a": torch.zeros(1)}, torch.bfloat16, where="t") == torch.bfloat16
    with pytest.raises(TypeError, match=r"t: dtype expected a floating-point torch.dtype, got torch.int64"):
        target_dtype({}, torch.int64, where="t")


def test_llava_projector_shape():
    sd = {"0.weight": torch.zeros(8, 6), "0.bias": torch.zeros(8), "2.weight": torch.zeros(8, 8), "2.bias": T}
    assert llava_projector_shape(sd, where="t") == ("mlp2x_gelu", 6, 8)
    assert llava_projector_shape({"0.weight": torch.zeros(8, 6)}, where="t") == ("linear", 6, 8)
    with pytest.raises(ValueError, match=r"t: unexpected keys \(1\): mm_projector.1.weight"):
        llava_projector_shape({"0.weight": T, "1.weight": T}, where="t")
    with pytest.raises(ValueError, match=r"without gaps; found mm_projector.0.weight, mm_projector.4.weight"):
        llava_projector_shape({"0.weight": torch.zeros(2, 2), "4.weight": torch.zeros(2, 2)}, where="t")
