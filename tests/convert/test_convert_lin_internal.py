"""Lin et al.'s internal-fusion checkpoints: key layouts, whole-token projector matching, strictness."""

from __future__ import annotations

import pytest
import torch

from layerfuse import from_official
from layerfuse.internal import InternalDirect, InternalModular


def _projector(value: float, c: int = 4, h: int = 8) -> dict[str, torch.Tensor]:
    return {"0.weight": torch.full((h, c), value), "0.bias": torch.full((h,), value),
            "2.weight": torch.full((h, h), value), "2.bias": torch.full((h,), value)}


def _checkpoint(count: int, *, prefix: str = "model.") -> dict[str, torch.Tensor]:
    state = {f"{prefix}mm_projector_f.{k}": v for k, v in _projector(-1.0).items()}
    for i in range(count):
        state |= {f"{prefix}mm_projectors.{i}.{k}": v for k, v in _projector(float(i)).items()}
    return state


def _ucross(layer: int, h: int = 8, inter: int = 16, prefix: str = "model.") -> dict[str, torch.Tensor]:
    p = f"{prefix}layers.{layer}."
    state = {f"{p}ucross_attn.{n}_proj.weight": torch.randn(h, h) for n in "qkvo"}
    state |= {f"{p}ucross_mlp.{n}_proj.weight": torch.randn(inter, h) for n in ("gate", "up")}
    state[f"{p}ucross_mlp.down_proj.weight"] = torch.randn(h, inter)
    state[f"{p}ucross_xattn.weight"] = torch.tensor([0.5])
    state[f"{p}ucross_xmlp.weight"] = torch.tensor([-0.5])
    return state


def test_projectors_match_on_the_whole_index_not_the_substring():
    """The authors' filter puts mm_projectors.10-19 into projector 1; the converter keeps them apart."""
    fusion = from_official("lin_internal", _checkpoint(24), strategy="all", num_layers=24)
    assert isinstance(fusion, InternalDirect)
    assert fusion.fused_layers == tuple(range(24))
    for i in (1, 2, 10, 19, 23):
        assert torch.equal(fusion.projectors[i][0].weight, torch.full((8, 4), float(i)))
    assert torch.equal(fusion.input_projector[2].bias, torch.full((8,), -1.0))


def test_any_prefix_and_num_layers_read_from_the_llm_keys():
    state = _checkpoint(3, prefix="base_model.model.model.")
    state |= {f"model.layers.{j}.self_attn.q_proj.weight": torch.zeros(8, 8) for j in range(32)}
    fusion = from_official("lin_internal", state, strategy="3-18-23")
    assert fusion.fused_layers == (3, 23, 29)


def test_strict_keys_list_missing_and_unexpected():
    state = _checkpoint(4)  # 3-18-23 has three injected projectors
    del state["model.mm_projectors.1.2.bias"]
    state |= _ucross(7)
    with pytest.raises(ValueError, match="nothing was loaded") as error:
        from_official("lin_internal", state, strategy="3-18-23", num_layers=8, paradigm="I_D")
    message = str(error.value)
    assert "missing keys (1): projectors.1.2.bias" in message
    assert "model.mm_projectors.3.0.weight" in message
    assert "model.layers.7.ucross_attn.q_proj.weight" in message


def test_internal_modular_keys_and_modes():
    state = _checkpoint(1) | _ucross(17)
    with pytest.raises(ValueError, match="needs num_heads"):
        from_official("lin_internal", state, strategy="18", num_layers=24)
    fusion = from_official("lin_internal", state, strategy="18", num_layers=24, num_heads=2)
    assert isinstance(fusion, InternalModular)
    assert (fusion.mode, fusion.fused_layers, fusion.num_kv_heads, fusion.intermediate_size) == ("authors", (17,), 2, 16)
    assert torch.equal(fusion.blocks[0].attn.v_proj.weight, state["model.layers.17.ucross_attn.v_proj.weight"])
    assert fusion.blocks[0].mlp_gate.weight.item() == -0.5
    corrected = from_official("lin_internal", state, strategy="18", num_layers=24, num_heads=2, mode="corrected")
    assert torch.equal(corrected.blocks[0].attn_norm.weight, torch.ones(8))


def test_errors_name_what_is_needed():
    with pytest.raises(ValueError, match="num_layers"):
        from_official("lin_internal", _checkpoint(3), strategy="3-18-23")
    with pytest.raises(ValueError, match=r"no key contains 'mm_projector_f\.'"):
        from_official("lin_internal", {"model.mm_projectors.0.0.weight": torch.zeros(8, 4)}, num_layers=8)
    with pytest.raises(ValueError, match="paradigm expected one of 'I_D', 'I_M'"):
        from_official("lin_internal", _checkpoint(3), num_layers=8, paradigm="E_D")
