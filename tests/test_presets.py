import pytest
import torch

from layerfuse import ConcatFuser, Fuser, TokenConcatFuser, WeightedSumFuser
from layerfuse.presets import (
    PRESETS,
    build_fuser,
    build_fusion_projector,
    preset_layers,
    preset_names,
    preset_plan,
)

CLIP_L = {  # specs §2, §3.2-3.3, §5.4, §6.3, §8.1 (HF hidden-state indices)
    "llava": (23,),
    "dense_connector_sti": (23, 7, 15),
    "dense_connector_sci": (23, 7, 15),
    "lin_ed_18": (18, 23),
    "lin_ed_3_18_23": (3, 18, 23),
    "look_shallower": (3, 18, 23),
    "llava_next_slicefour": (4, 10, 16, 22),
    "vip_llava": (23, 20, 17, 14, 6),
    "comm_dino": (19, 20, 21, 22, 23, 24),
}


def _blocks(plan):
    return [[plan.layers[i] for i in term] if not isinstance(term, int) else [plan.layers[term]]
            for term in plan.options["terms"]]


@pytest.mark.parametrize(("name", "layers"), CLIP_L.items())
def test_clip_l_layers(name, layers):
    assert preset_layers(name) == layers


def test_clip_l_groups():
    assert _blocks(preset_plan("dense_connector_dci")) == [[23], list(range(12)), list(range(12, 24))]
    assert _blocks(preset_plan("lin_ed_former")) == [list(range(1, 13)), [23]]
    assert _blocks(preset_plan("lin_ed_latter")) == [list(range(13, 25)), [23]]
    assert _blocks(preset_plan("lin_ed_all")) == [list(range(1, 13)), list(range(13, 25)), [23]]
    assert preset_layers("comm_clip") == tuple(range(1, 25))


def test_siglip_depth_27_matches_the_authors():
    assert preset_layers("lin_ed_3_18_23", 27) == (3, 20, 25)  # Lin et al.'s SigLIP list
    assert preset_layers("dense_connector_sci", 27) == (26, 7, 15)
    assert _blocks(preset_plan("dense_connector_dci", 27)) == [[26], list(range(13)), list(range(13, 26))]
    assert preset_layers("llava_next_slicefour", 27) == (5, 12, 19, 26)
    assert max(max(preset_layers(n, 27)) for n in preset_names() if not n.startswith(("comm", "lin_ed_latter", "lin_ed_all"))) <= 26


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_cites(name):
    doc = PRESETS[name].__doc__
    assert doc
    assert any(str(year) in doc for year in range(2023, 2026))
    for depth in (12, 24, 27, 40):
        plan = preset_plan(name, depth)
        assert all(0 <= k <= depth for k in plan.layers)
        assert len(set(plan.layers)) == len(plan.layers)
        fuser = build_fuser(name, dim=4, depth=depth)
        assert fuser.num_inputs == len(plan.layers)


def test_build_fusion_projector_end_to_end():
    module = build_fusion_projector("dense_connector_dci", dim=8, llm_dim=6)
    hidden = [torch.randn(1, 5, 8) for _ in range(25)]
    out = module([hidden[k] for k in module.layers])
    assert out.shape == (1, 5, 6)
    assert module.tokens == "patch"
    assert module.projector.kind == "mlp2x_gelu"
    linear = build_fusion_projector("look_shallower", dim=8, llm_dim=6, projector="linear")
    assert linear.projector.in_dim == 24
    assert linear.layers == (3, 18, 23)


def test_from_preset_constructors():
    assert isinstance(ConcatFuser.from_preset("vip_llava", dim=4), ConcatFuser)
    assert ConcatFuser.from_preset("vip_llava", dim=4).norm is not None
    assert isinstance(TokenConcatFuser.from_preset("dense_connector_sti", dim=4), TokenConcatFuser)
    fuser = WeightedSumFuser.from_preset("comm_clip", dim=4, dtype=torch.float64)
    assert fuser.layer_weights.dtype == torch.float64
    assert isinstance(Fuser.from_preset("lin_ed_all", dim=4), ConcatFuser)  # any kind through the base class


def test_errors():
    with pytest.raises(ValueError, match=r"preset_plan: name expected one of .*'vip_llava', got 'dci'"):
        preset_layers("dci")
    with pytest.raises(ValueError, match=r"preset 'vip_llava' at depth=8 needs hidden states \[7, 4, 1, -2, 6\]"):
        preset_layers("vip_llava", 8)
    with pytest.raises(TypeError, match=r"preset_plan: depth expected a positive int, got float 24.0"):
        preset_layers("llava", 24.0)
