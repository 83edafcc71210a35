import pytest
import torch

from fixture_utils import assert_fixture_close, load_fixture
from layerfuse import FusionProjector, InstructionGatedFuser, Projector, from_official
from layerfuse.convert.igva import gate_key_to_official
from layerfuse.convert.state_dict import llava_projector_shape


@pytest.fixture(scope="module")
def fx():
    return load_fixture("igva_aggregator")


def checkpoint(fx, prefix="model."):
    return {f"{prefix}{k[len('param.'):]}": v for k, v in fx.tensors.items() if k.startswith("param.")}


def features(fx, module):
    hidden = fx.hidden_states()
    return [hidden[i] for i in module.layers]


def export_official(module: FusionProjector, prefix="model."):
    """A layerfuse IGVA pipeline's weights under the authors' model-level names."""
    renames = {"fuser.gate.": "vision_aggregator.", "projector.": "mm_projector."}
    out = {}
    for key, value in module.state_dict().items():
        ours = next(p for p in renames if key.startswith(p))
        out[prefix + renames[ours] + gate_key_to_official(key[len(ours):])] = value
    return out


def test_any_prefix_and_the_llm_keys_ignored(fx):
    sd = checkpoint(fx, prefix="base_model.model.model.")
    sd["base_model.model.model.layers.0.self_attn.q_proj.weight"] = torch.zeros(2, 2)
    module = from_official("igva", sd)
    assert isinstance(module.fuser, InstructionGatedFuser)
    assert module.fuser.gate.num_blocks == 4
    assert module.fuser.gate.dim == 24
    assert module.fuser.text_dim == 20
    assert module.fuser.dim == 16
    assert module.projector.kind == "mlp2x_gelu"
    assert module.out_dim == 28
    assert_fixture_close(module(features(fx, module), text=fx.inputs()[0]), fx["output"], name="output")


def test_bf16_checkpoint_upcast_and_explicit_dtype(fx):
    sd = {k: v.to(torch.bfloat16) for k, v in checkpoint(fx).items()}
    module = from_official("igva", sd)
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    module64 = from_official("igva", sd, dtype=torch.float64)
    assert {p.dtype for p in module64.parameters()} == {torch.float64}
    assert torch.equal(module64.fuser.gate.linear.weight, sd["model.vision_aggregator.linear.weight"].double())


def test_round_trip_other_sizes_loads_strict():
    fuser = InstructionGatedFuser(6, 5, groups=[[0, 1, 2], [3, 4]], base_layer=4, gate_dim=10, num_blocks=2,
                                  num_heads=2, dtype=torch.float64)
    with torch.no_grad():
        fuser.gate.linear.weight.normal_()
    module = FusionProjector(fuser, Projector("linear", 12, 7, dtype=torch.float64),
                             layers=fuser.layers, tokens="cls_patch")
    loaded = from_official("igva", export_official(module), groups=[[0, 1, 2], [3, 4]], base_layer=4, heads=2)
    assert loaded.fuser.get_config() == fuser.get_config()
    assert loaded.projector.kind == "linear"
    feats = [torch.randn(2, 5, 6, dtype=torch.float64) for _ in fuser.layers]
    text = torch.randn(2, 5, dtype=torch.float64)
    assert torch.equal(loaded(feats, text=text), module(feats, text=text))
    # heads cannot be read from the shapes; a different split gives a different gate
    other = from_official("igva", export_official(module), groups=[[0, 1, 2], [3, 4]], base_layer=4, heads=5)
    assert not torch.allclose(other(feats, text=text), module(feats, text=text))


def test_stage1_checkpoint_then_zero_init_stage2_continues_it():
    fx1 = load_fixture("igva_stage1_average")
    stage1 = from_official("igva", checkpoint(fx1), average=True)
    assert stage1.layers == (*range(1, 25), -2)
    assert stage1.tokens == "cls_patch"
    stage2 = FusionProjector(
        InstructionGatedFuser(16, 20, gate_dim=8, zero_init_head=True, dtype=torch.float64),
        Projector("mlp2x_gelu", 32, 28, dtype=torch.float64), layers=stage1.layers, tokens="cls_patch",
    )
    stage2.projector.load_state_dict(stage1.projector.state_dict())
    feats = features(fx1, stage1)
    text = torch.nn.functional.normalize(torch.randn(1, 20, dtype=torch.float64), dim=-1)
    assert torch.equal(stage2(feats, text=text), stage1(feats))
    assert_fixture_close(stage2(feats, text=text), fx1["output"], name="output")


def test_missing_and_unexpected_keys_listed(fx):
    sd = checkpoint(fx)
    del sd["model.vision_aggregator.transformers.2.norm1.bias"]
    sd["model.vision_aggregator.transformers.0.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"(?s)convert_igva \(vision_aggregator.\*, mm_projector.\*\): the weights do "
                                         r"not fit FusionProjector; nothing was loaded.\nmissing keys \(1\): "
                                         r"fuser.gate.transformers.2.norm1.bias\nunexpected keys \(1\): "
                                         r"fuser.gate.transformers.0.extra"):
        from_official("igva", sd)


def test_block_numbering_must_start_at_zero(fx):
    sd = {k.replace("transformers.3.", "transformers.5."): v for k, v in checkpoint(fx).items()}
    with pytest.raises(ValueError, match=r"convert_igva: missing keys \(1\): vision_aggregator.transformers."
                                         r"\{0, 1, \.\.\.\}\.\*: a run of blocks numbered from 0 "
                                         r"\(found \[0, 1, 2, 5\]\)"):
        from_official("igva", sd)
    sd = {k: v for k, v in checkpoint(fx).items() if not k.endswith("linear.weight")}
    with pytest.raises(ValueError, match=r"convert_igva: missing keys \(1\): vision_aggregator.linear.weight"):
        from_official("igva", sd)


def test_stage_mismatch(fx):
    with pytest.raises(ValueError, match=r"convert_igva: average=True builds the stage-1 model, which has no "
                                         r"aggregator, but the checkpoint holds 54 vision_aggregator.\* keys"):
        from_official("igva", checkpoint(fx), average=True)
    projector_only = {k: v for k, v in checkpoint(fx).items() if "mm_projector" in k}
    with pytest.raises(ValueError, match=r"convert_igva: no key contains 'vision_aggregator.'; .*pass average=True"):
        from_official("igva", projector_only)


def test_shape_and_option_errors(fx):
    with pytest.raises(ValueError, match=r"convert_igva: vision_aggregator.linear.weight gives 4 groups but groups= "
                                         r"has 2: \[\[1, 2\], \[3, 4\]\]"):
        from_official("igva", checkpoint(fx), groups=[[1, 2], [3, 4]])
    with pytest.raises(ValueError, match=r"convert_igva: heads=5 does not divide the aggregator width 24"):
        from_official("igva", checkpoint(fx), heads=5)
    with pytest.raises(ValueError, match=r"convert_igva: heads expected a positive int, got 0"):
        from_official("igva", checkpoint(fx), heads=0)
    with pytest.raises(ValueError, match=r"convert_igva: no key contains 'mm_projector.'"):
        from_official("igva", {k: v for k, v in checkpoint(fx).items() if "mm_projector" not in k})
    sd = checkpoint(fx)
    sd["model.mm_projector.0.weight"] = torch.zeros(28, 33, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"convert_igva: mm_projector.0.weight has 33 input columns; IGVA's "
                                         r"projector reads \[base ; fused\], an even width 2C"):
        from_official("igva", sd)
    sd["model.mm_projector.0.weight"] = torch.zeros(28, 34, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"convert_igva: vision_aggregator.cls_proj.weight reads width 16 but "
                                         r"mm_projector.0.weight has 34 input columns = 2 x 17"):
        from_official("igva", sd)
    with pytest.raises(TypeError, match=r"'igva' takes the options .*; got unknown grid"):
        from_official("igva", checkpoint(fx), grid=(5, 5))


def test_llava_projector_shape():
    w = {"0.weight": torch.zeros(8, 6), "0.bias": torch.zeros(8), "2.weight": torch.zeros(8, 8)}
    assert llava_projector_shape(w, where="t") == ("mlp2x_gelu", 6, 8)
    assert llava_projector_shape({"0.weight": torch.zeros(4, 3)}, where="t") == ("linear", 3, 4)
    with pytest.raises(ValueError, match=r"t: unexpected keys \(1\): mm_projector.1.weight; a LLaVA projector holds"):
        llava_projector_shape({"0.weight": torch.zeros(4, 3), "1.weight": torch.zeros(4)}, where="t")
    with pytest.raises(ValueError, match=r"t: missing keys: a LLaVA projector needs mm_projector.0.weight, "
                                         r"mm_projector.2.weight, ... without gaps; found mm_projector.0.weight, "
                                         r"mm_projector.4.weight"):
        llava_projector_shape({"0.weight": torch.zeros(4, 3), "4.weight": torch.zeros(4, 4)}, where="t")
