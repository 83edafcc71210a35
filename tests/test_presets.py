import pytest
import torch

from layerfuse import ConcatFuser, Fuser, FusionProjector, TokenConcatFuser, WeightedSumFuser
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
    assert preset_layers(name, 24) == layers
    assert preset_layers(name, depth=24) == layers


def test_clip_l_groups():
    assert _blocks(preset_plan("dense_connector_dci", 24)) == [[23], list(range(12)), list(range(12, 24))]
    assert _blocks(preset_plan("lin_ed_former", 24)) == [list(range(1, 13)), [23]]
    assert _blocks(preset_plan("lin_ed_latter", 24)) == [list(range(13, 25)), [23]]
    assert _blocks(preset_plan("lin_ed_all", 24)) == [list(range(1, 13)), list(range(13, 25)), [23]]
    assert preset_layers("comm_clip", 24) == tuple(range(1, 25))


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
    module = build_fusion_projector("dense_connector_dci", dim=8, llm_dim=6, depth=24)
    hidden = [torch.randn(1, 5, 8) for _ in range(25)]
    out = module([hidden[k] for k in module.layers])
    assert out.shape == (1, 5, 6)
    assert module.tokens == "patch"
    assert module.projector.kind == "mlp2x_gelu"
    linear = build_fusion_projector("look_shallower", dim=8, llm_dim=6, depth=24, projector="linear")
    assert linear.projector.in_dim == 24
    assert linear.layers == (3, 18, 23)


def test_from_preset_constructors():
    assert isinstance(ConcatFuser.from_preset("vip_llava", dim=4, depth=24), ConcatFuser)
    assert ConcatFuser.from_preset("vip_llava", dim=4, depth=24).norm is not None
    assert isinstance(TokenConcatFuser.from_preset("dense_connector_sti", dim=4, depth=24), TokenConcatFuser)
    fuser = WeightedSumFuser.from_preset("comm_clip", dim=4, depth=24, dtype=torch.float64)
    assert fuser.layer_weights.dtype == torch.float64
    assert isinstance(Fuser.from_preset("lin_ed_all", dim=4, depth=24), ConcatFuser)  # any kind through the base class


def test_errors():
    with pytest.raises(ValueError, match=r"preset_layers: name expected one of .*'vip_llava', got 'dci'"):
        preset_layers("dci", 24)
    with pytest.raises(
        ValueError,
        match=r"preset 'vip_llava' degenerates at depth=8: it needs hidden states \[7, 4, 1, -2, 6\], but a 8-block "
        r"backbone has 0..8 \(\[-2\] do not exist\)",
    ):
        preset_layers("vip_llava", 8)
    with pytest.raises(TypeError, match=r"preset_plan: depth expected a positive int, got float 24.0"):
        preset_plan("llava", 24.0)


# --- a preset is made for a stated depth (or the tower's), says what to tap, refuses a degenerate depth ---


def _tiny_vit(depth):
    timm = pytest.importorskip("timm")
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=16, embed_dim=16, depth=depth, num_heads=2, num_classes=0
    ).eval()


NO_DEPTH = {
    "preset_plan": lambda: preset_plan("lin_ed_18"),
    "preset_layers": lambda: preset_layers("lin_ed_18"),
    "build_fuser": lambda: build_fuser("lin_ed_18", dim=4),
    "build_fusion_projector": lambda: build_fusion_projector("lin_ed_18", dim=4, llm_dim=6),
    "ConcatFuser.from_preset": lambda: ConcatFuser.from_preset("lin_ed_18", dim=4),
    "Fuser.from_preset": lambda: Fuser.from_preset("lin_ed_18", 4),
    "FusionProjector.from_preset": lambda: FusionProjector.from_preset("lin_ed_18", dim=4, llm_dim=6),
}


@pytest.mark.parametrize("entry", NO_DEPTH)
def test_no_silent_default_depth(entry):
    with pytest.raises(TypeError, match=r"preset 'lin_ed_18' needs the backbone's depth: pass depth=D .* or tower="):
        NO_DEPTH[entry]()


def test_depth_from_the_tower_or_its_tap():
    from layerfuse import LayerTap

    vit = _tiny_vit(12)
    assert preset_layers("lin_ed_3_18_23", tower=vit) == preset_layers("lin_ed_3_18_23", 12) == (1, 9, 11)
    with LayerTap(vit, [0]) as tap:
        assert preset_plan("dense_connector_sci", tower=tap).depth == 12
    assert preset_layers("llava", 12, tower=vit) == (11,)  # agreeing depth and tower are fine
    with pytest.raises(ValueError, match=r"preset_layers: depth=24 contradicts the tower, which has 12 blocks"):
        preset_layers("llava", 24, tower=vit)
    with pytest.raises(TypeError, match=r"preset_plan: tower expected the vision tower .* got str"):
        preset_plan("llava", tower="clip")


def test_tower_to_tap_to_fuser_end_to_end():
    from layerfuse import LayerTap

    vit = _tiny_vit(12)
    module = build_fusion_projector("dense_connector_dci", dim=16, llm_dim=6, tower=vit)
    with LayerTap(vit, module.layers, tokens=module.tokens) as tap:
        features = tap(torch.randn(2, 3, 32, 32))
    assert module.fuser.layers == module.layers == tuple(range(12))
    assert module(features).shape == (2, 4, 6)
    assert module(features, grid=features.grid).shape == (2, 4, 6)


DEGENERATE = [  # (name, depth, what the message says)
    ("lin_ed_18", 4, r"it would use layer 3 twice; the smallest depth it supports is 5"),
    ("lin_ed_3_18_23", 4, r"it would use layer 3 twice"),
    ("llava_next_slicefour", 2, r"its slice step \(D \+ 1\) // 4 is 0 with D \+ 1 = 3 hidden states"),
    ("llava_next_slicefour", 8, r"gives 5 layers \[0, 2, 4, 6, 8\], not the four"),
    ("vip_llava", 10, r"it would use layer 6 twice; the smallest depth it supports is 11"),
    ("vip_llava", 8, r"\(\[-2\] do not exist\)"),
    ("dense_connector_dci", 1, r"its layer groups 0..n-1 and n..2n-1 are empty"),
    ("dense_connector_dci", 3, r"its layer mean over \[0\] has a single layer"),
    ("dense_connector_sti", 2, r"it would use layer 1 twice"),
    ("lin_ed_former", 2, r"its layer mean over \[1\] has a single layer"),
    ("comm_dino", 4, r"\(\[-1\] do not exist\)"),
]


@pytest.mark.parametrize(("name", "depth", "words"), DEGENERATE)
def test_degenerate_depths_are_refused(name, depth, words):
    for call in (
        lambda: preset_plan(name, depth),
        lambda: build_fuser(name, dim=4, depth=depth),
        lambda: build_fusion_projector(name, dim=4, llm_dim=4, depth=depth),
    ):
        with pytest.raises(ValueError, match=rf"preset {name!r} degenerates at depth={depth}: .*{words}"):
            call()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_accepted_depth_gives_distinct_layers_in_range(name):
    # Whatever preset_plan accepts is sound, checked here without the catalogue's own checker.
    accepted = 0
    for depth in range(1, 49):
        try:
            plan = preset_plan(name, depth)
        except ValueError as err:
            message = str(err)
            assert f"preset {name!r} degenerates at depth={depth}" in message
            continue
        accepted += 1
        assert all(0 <= k <= depth for k in plan.layers)
        assert len(set(plan.layers)) == len(plan.layers)
        blocks = _blocks(plan) if plan.fuser == "ConcatFuser" else [[k] for k in plan.layers]
        assert len({frozenset(b) for b in blocks}) == len(blocks)  # no channel block twice
        groups = [t for t in plan.options.get("terms", []) if not isinstance(t, int)]
        assert all(len(g) >= 2 for g in groups)  # a mean is over several layers
        if name == "llava_next_slicefour":
            assert len(plan.layers) == 4
    assert accepted >= 30


def test_fuser_from_a_preset_says_what_to_tap():
    fuser = ConcatFuser.from_preset("lin_ed_3_18_23", dim=4, depth=27)
    assert fuser.layers == (3, 20, 25)
    assert fuser.tokens == "patch"
    assert (fuser.preset.name, fuser.preset.depth) == ("lin_ed_3_18_23", 27)
    plain = ConcatFuser([4, 4])
    assert (plain.layers, plain.tokens, plain.preset) == (None, None, None)
    sti = TokenConcatFuser.from_preset("dense_connector_sti", dim=4, depth=24)
    assert (sti.layers, sti.tokens) == ((23, 7, 15), "patch")


@pytest.mark.parametrize("name", ["lin_ed_all", "dense_connector_sti", "comm_dino"])
def test_preset_survives_save_and_load(name, tmp_path):
    pytest.importorskip("safetensors")
    fuser = build_fuser(name, dim=4, depth=27)
    fuser.save_pretrained(tmp_path / "fuser")
    again = Fuser.from_pretrained(tmp_path / "fuser")
    assert (again.layers, again.tokens, again.preset) == (fuser.layers, fuser.tokens, fuser.preset)
    module = build_fusion_projector(name, dim=4, llm_dim=6, depth=27)
    module.save_pretrained(tmp_path / "module")
    loaded = FusionProjector.from_pretrained(tmp_path / "module")
    assert loaded.layers == loaded.fuser.layers == module.layers


def test_forward_errors_name_the_preset_and_depth():
    from layerfuse import LayerFeatures

    dci = ConcatFuser.from_preset("dense_connector_dci", dim=8, depth=4)
    assert dci.layers == (0, 1, 2, 3)
    with pytest.raises(
        ValueError,
        match=r"ConcatFuser.forward: features expected 4 tensors, got 3 \(preset 'dense_connector_dci' at depth=4 "
        r"reads hidden states \[0, 1, 2, 3\] with tokens='patch'; tap them with LayerTap\(model, fuser.layers",
    ):
        dci([torch.randn(1, 4, 8)] * 3)
    wrong = LayerFeatures([torch.randn(1, 4, 8)] * 4, grid=(2, 2), layers=(1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"features were tapped from hidden states \[1, 2, 3, 4\] but the module reads \[0, 1, 2, 3\]"):
        dci(wrong)
    negative = LayerFeatures([torch.randn(1, 4, 8)] * 4, grid=(2, 2), layers=(-5, -4, -3, -2))  # = 0..3 at depth 4
    assert dci(negative).shape == (1, 4, 24)
    cls = LayerFeatures([torch.randn(1, 5, 8)] * 4, grid=(2, 2), layers=(0, 1, 2, 3), num_prefix_tokens=1)
    with pytest.raises(ValueError, match=r"features carry 1 prefix token\(s\) \(from the tap\) but the fuser expects 0; "
                                         r"tap with tokens='patch' \(preset 'dense_connector_dci' at depth=4"):
        dci(cls)
    module = build_fusion_projector("dense_connector_dci", dim=8, llm_dim=6, depth=4)
    with pytest.raises(ValueError, match=r"FusionProjector.forward: features were tapped from hidden states \[1, 2, 3, 4\]"):
        module(wrong)
