import math

import pytest
import torch
from torch import nn

from fixture_utils import assert_fixture_close, load_fixture
from layerfuse import FusionProjector, InstructionGatedFuser, LayerFeatures, Projector, from_official
from layerfuse.convert.igva import gate_key_to_official
from layerfuse.fusers.instruction_gated import IGVA_GROUPS, gate_entropy_loss
from layerfuse.layers.instruction_gate import GateAttention, InstructionGate

SMALL_GROUPS = [[1, 2], [3, 4, 5], [6]]


def official_state(fx):
    return {f"model.{k[len('param.'):]}": v for k, v in fx.tensors.items() if k.startswith("param.")}


def official_name(name):
    for ours, theirs in (("fuser.gate.", "vision_aggregator."), ("projector.", "mm_projector.")):
        if name.startswith(ours):
            return theirs + gate_key_to_official(name[len(ours):])
    raise KeyError(name)


def small_fuser(**kwargs):
    options = {"groups": SMALL_GROUPS, "base_layer": -2, "gate_dim": 12, "num_blocks": 2, "num_heads": 3}
    options.update(kwargs)
    return InstructionGatedFuser(8, 6, **options)


def small_inputs(fuser, batch=2, tokens=7, dtype=torch.float32):
    feats = [torch.randn(batch, tokens, fuser.dim, dtype=dtype) for _ in fuser.layers]
    text = torch.nn.functional.normalize(torch.randn(batch, fuser.text_dim, dtype=dtype), dim=-1)
    return feats, text


@pytest.fixture(scope="module")
def aggregator():
    fx = load_fixture("igva_aggregator")
    module = from_official("igva", official_state(fx))
    hidden = fx.hidden_states()
    return fx, module, [hidden[i] for i in module.layers], fx.inputs()[0]


def test_fixture_aggregator_forward_and_intermediates(aggregator):
    fx, module, feats, text = aggregator
    assert module.layers == (*range(1, 25), -2)
    assert module.tokens == "cls_patch"
    fused = module.fuser.forward_with_weights(feats, text=text)
    c = module.fuser.dim
    assert_fixture_close(fused.weights, fx["weights"], name="weights")
    assert_fixture_close(fused.output, fx["projector_input"], name="projector_input")
    assert_fixture_close(fused.output[..., c:], fx["fused_map"], name="fused_map")
    assert_fixture_close(module.fuser.gate_weights(feats, text=text), fx["weights"], name="gate_weights")
    means = module.fuser.group_means(feats)
    for g in range(module.fuser.num_groups):
        assert_fixture_close(means[:, g], fx[f"group_mean.{g}"], name=f"group_mean.{g}")
    assert_fixture_close(means[:, :, 0], fx["cls_group_means"], name="cls_group_means")
    assert_fixture_close(module(feats, text=text), fx["output"], name="output")
    # the two samples get different, non-uniform weights
    assert not torch.allclose(fused.weights[0], fused.weights[1])


def test_fixture_aggregator_gradients(aggregator):
    fx, module, feats, text = aggregator
    module.zero_grad(set_to_none=True)
    (module(feats, text=text) * fx["upstream"]).sum().backward()
    names = [name for name, _ in module.named_parameters()]
    assert len(names) == len([k for k in fx.tensors if k.startswith("grad.param.")])
    for name, param in module.named_parameters():
        assert_fixture_close(param.grad, fx[f"grad.param.{official_name(name)}"], name=name)


def test_fixture_stage1_average():
    fx = load_fixture("igva_stage1_average")
    module = from_official("igva", official_state(fx), average=True)
    assert module.fuser.gate is None
    hidden = fx.hidden_states()
    feats = [hidden[i] for i in module.layers]
    means = module.fuser.group_means(feats)
    for g in range(4):
        assert_fixture_close(means[:, g], fx[f"group_mean.{g}"], name=f"group_mean.{g}")
    fused = module.fuser.forward_with_weights(feats)
    assert torch.equal(fused.weights, torch.full((1, 4), 0.25, dtype=torch.float64))
    assert_fixture_close(fused.output, fx["projector_input"], name="projector_input")
    assert_fixture_close(fused.output[..., 16:], fx["fused_map"], name="fused_map")
    out = module(feats)
    assert_fixture_close(out, fx["output"], name="output")
    (out * fx["upstream"]).sum().backward()
    for name, param in module.named_parameters():
        assert_fixture_close(param.grad, fx[f"grad.param.{official_name(name)}"], name=name)


def test_zero_logits_equal_stage1_average_model(aggregator):
    fx, _module, feats, text = aggregator
    gated = from_official("igva", official_state(fx))
    with torch.no_grad():
        gated.fuser.gate.linear.weight.zero_()
        gated.fuser.gate.linear.bias.zero_()
    average = FusionProjector(
        InstructionGatedFuser(16, gated=False, dtype=torch.float64), gated.projector,
        layers=gated.layers, tokens="cls_patch",
    )
    assert torch.equal(gated(feats, text=text), average(feats))


def test_zero_init_head_starts_uniform_and_equals_average():
    fuser = small_fuser(zero_init_head=True)
    feats, text = small_inputs(fuser)
    out = fuser.forward_with_weights(feats, text=text)
    assert torch.equal(out.weights, torch.full((2, 3), 1 / 3))
    average = small_fuser(gated=False)
    assert torch.equal(out.output, average(feats))
    # the head is trainable: one gradient step moves the weights away from uniform
    loss = (fuser(feats, text=text) * torch.randn(2, 6, 16)).sum()
    loss.backward()
    assert fuser.gate.linear.weight.grad.abs().sum() > 0
    fuser.gate.linear.weight.data.normal_()
    fuser.reset_parameters()
    assert torch.count_nonzero(fuser.gate.linear.weight) == 0


@pytest.mark.parametrize(("groups", "gate_dim", "num_blocks", "num_heads"), [
    ([[0, 1], [2, 3]], 8, 1, 1),
    ([[1], [2, 3, 4], [5, 6]], 12, 3, 4),
    ([[2, 3, 4, 5]], 6, 2, 2),
])
def test_configurable_and_weights_on_simplex(groups, gate_dim, num_blocks, num_heads):
    fuser = InstructionGatedFuser(8, 5, groups=groups, base_layer=3, gate_dim=gate_dim,
                                  num_blocks=num_blocks, num_heads=num_heads)
    assert len(fuser.gate.transformers) == num_blocks
    assert fuser.gate.linear.out_features == len(groups)
    assert fuser.layers == (*(i for g in groups for i in g), 3)
    feats, text = small_inputs(fuser, batch=3)
    out = fuser.forward_with_weights(feats, text=text)
    assert out.output.shape == (3, 6, 16)
    assert out.weights.shape == (3, len(groups))
    assert torch.allclose(out.weights.sum(-1), torch.ones(3))
    assert bool((out.weights >= 0).all())


def test_projector_input_is_base_then_fused():
    fuser = small_fuser()
    feats, text = small_inputs(fuser)
    out = fuser.forward_with_weights(feats, text=text)
    assert torch.equal(out.output[..., :8], feats[-1][:, 1:])
    means = fuser.group_means(feats)[:, :, 1:]
    fused = torch.einsum("bk,bknc->bnc", out.weights, means)
    torch.testing.assert_close(out.output[..., 8:], fused)


def test_parameter_counts_at_igva_scale():
    fuser = InstructionGatedFuser(1024, 768, device="meta")
    assert fuser.groups == IGVA_GROUPS
    assert sum(p.numel() for p in fuser.parameters()) == 27_047_940
    assert sum(p.numel() for p in fuser.gate.transformers[0].parameters()) == 6_301_696
    projector = Projector("mlp2x_gelu", fuser.out_dim, 4096, device="meta")
    assert sum(p.numel() for p in projector.parameters()) == 25_174_016


def test_gate_attention_equals_multihead_attention_float64():
    attn = GateAttention(12, 3, dtype=torch.float64)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_()
    reference = nn.MultiheadAttention(12, 3, batch_first=True, dtype=torch.float64)
    # same layout as nn.MultiheadAttention except the head-mixing layer's name
    reference.load_state_dict({k.replace("mix_heads.", "out_proj."): v for k, v in attn.state_dict().items()})
    q, kv = torch.randn(2, 1, 12, dtype=torch.float64), torch.randn(2, 5, 12, dtype=torch.float64)
    expected, _ = reference(q, kv, kv, need_weights=False)
    torch.testing.assert_close(attn(q, kv), expected, rtol=1e-12, atol=1e-12)
    fresh = GateAttention(12, 3)
    assert torch.count_nonzero(fresh.in_proj_bias) == 0
    assert torch.count_nonzero(fresh.mix_heads.bias) == 0


def test_gate_keys_are_the_official_aggregator_keys():
    gate = InstructionGate(20, 16, 4, 24, 4, 4)
    fx = load_fixture("igva_aggregator")
    official = {k[len("param.vision_aggregator."):] for k in fx.tensors if k.startswith("param.vision_aggregator.")}
    assert {gate_key_to_official(f".{k}")[1:] for k in gate.state_dict()} == official


def test_no_cls_backbone_uses_mean_patch_token():
    fuser = small_fuser(has_cls=False)
    feats, text = small_inputs(fuser, tokens=6)
    out = fuser.forward_with_weights(feats, text=text)
    assert out.output.shape == (2, 6, 16)
    assert torch.equal(out.output[..., :8], feats[-1])
    means = fuser.group_means(feats)
    expected = fuser.gate(text, means.mean(dim=2))
    torch.testing.assert_close(out.weights, expected)
    torch.testing.assert_close(fuser.gate_weights(feats, text=text), expected)
    taps = LayerFeatures(feats, layers=fuser.layers, num_prefix_tokens=0)
    torch.testing.assert_close(fuser(taps, text=text), out.output)


def test_samples_without_instruction_take_a_zero_row():
    fuser = small_fuser()
    feats, text = small_inputs(fuser)
    text[1] = 0
    out = fuser.forward_with_weights(feats, text=text)
    assert bool(torch.isfinite(out.output).all())
    alone = fuser.forward_with_weights([f[1:] for f in feats], text=text[1:])
    torch.testing.assert_close(out.output[1:], alone.output)
    torch.testing.assert_close(out.weights[1:], alone.weights)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    fuser = small_fuser()
    feats, text = small_inputs(fuser)
    reference = fuser.forward_with_weights(feats, text=text)
    low = small_fuser().to(dtype)
    low.load_state_dict(fuser.state_dict())
    out = low.forward_with_weights([f.to(dtype) for f in feats], text=text)
    assert out.output.dtype == dtype
    assert out.weights.dtype == torch.float32
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(2))
    torch.testing.assert_close(out.output.float(), reference.output, rtol=0.05, atol=0.05)


def test_autocast():
    fuser = small_fuser()
    feats, text = small_inputs(fuser)
    reference = fuser.forward_with_weights(feats, text=text)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fuser.forward_with_weights(feats, text=text)
    assert out.weights.dtype == torch.float32
    assert out.output.dtype == torch.float32
    torch.testing.assert_close(out.output, reference.output, rtol=0.05, atol=0.05)


def test_compile_fullgraph():
    fuser = small_fuser()
    feats, text = small_inputs(fuser)
    compiled = torch.compile(fuser, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(feats, text=text), fuser(feats, text=text))


def test_gradcheck_float64():
    fuser = InstructionGatedFuser(3, 4, groups=[[1, 2], [3]], gate_dim=4, num_blocks=2, num_heads=2,
                                  dtype=torch.float64)
    feats = [torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True) for _ in fuser.layers]
    text = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, *f: fuser(list(f), text=t), (text, *feats), fast_mode=True)


def test_export():
    fuser = small_fuser()
    feats, text = small_inputs(fuser)
    exported = torch.export.export(fuser, (feats,), {"text": text})
    torch.testing.assert_close(exported.module()(feats, text=text), fuser(feats, text=text))


def test_layer_features_prefix_tokens_checked():
    fuser = small_fuser()
    feats, text = small_inputs(fuser)
    ok = LayerFeatures(feats, layers=fuser.layers, num_prefix_tokens=1)
    torch.testing.assert_close(fuser(ok, text=text), fuser(feats, text=text))
    patch_only = LayerFeatures(feats, layers=fuser.layers, num_prefix_tokens=0)
    with pytest.raises(ValueError, match=r"carry 0 prefix token\(s\) \(from the tap\) but has_cls=True expects 1; "
                                         r"tap with tokens='cls_patch'"):
        fuser(patch_only, text=text)


def test_bad_forward_inputs():
    fuser = small_fuser()
    feats, text = small_inputs(fuser)
    where = r"InstructionGatedFuser.forward: "
    with pytest.raises(ValueError, match=where + r"text expected shape \(B, 6\) with B=2 \(the features' batch\), "
                                               r"got \(2, 5\)"):
        fuser(feats, text=text[:, :5])
    with pytest.raises(ValueError, match=where + r"text expected shape \(B, 6\) with B=2.*got \(3, 6\)"):
        fuser(feats, text=torch.randn(3, 6))
    with pytest.raises(ValueError, match=where + r"text is required: the instruction embeddings \(B, 6\)"):
        fuser(feats)
    with pytest.raises(TypeError, match=where + r"text expected a torch.Tensor \(B, 6\), got list"):
        fuser(feats, text=[0.0] * 6)
    with pytest.raises(TypeError, match=where + r"text expected a floating-point tensor, got dtype torch.int64"):
        fuser(feats, text=torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=where + r"features expected 7 tensors, got 6"):
        fuser(feats[:-1], text=text)
    bad = [*feats[:-1], torch.randn(3, 7, 8)]
    with pytest.raises(ValueError, match=where + r"features\[6\] has batch size 3 but features\[0\] has 2"):
        fuser(bad, text=text)
    bad = [*feats[:-1], torch.randn(2, 7, 9)]
    with pytest.raises(ValueError, match=where + r"features\[6\] expected shape \(B, N, 8\), got \(2, 7, 9\)"):
        fuser(bad, text=text)
    bad = [*feats[:-1], torch.randn(2, 5, 8)]
    with pytest.raises(ValueError, match=where + r"features\[6\] has 5 tokens but features\[0\] has 7"):
        fuser(bad, text=text)
    with pytest.raises(ValueError, match=where + r"has_cls=True expects a CLS token followed by patch tokens, "
                                               r"got 1 token\(s\)"):
        fuser([f[:, :1] for f in feats], text=text)
    with pytest.raises(TypeError, match=where + r"features\[0\] has dtype torch.float64 but the module's parameters "
                                              r"are torch.float32"):
        fuser([f.double() for f in feats], text=text.double())
    with pytest.raises(ValueError, match=r"InstructionGatedFuser.forward: text must be None for a fuser built with "
                                         r"gated=False \(the stage-1 uniform average has no gate\), got Tensor"):
        small_fuser(gated=False)(feats, text=text)


def test_bad_construction():
    where = r"InstructionGatedFuser: "
    with pytest.raises(ValueError, match=where + r"groups\[1\] expected a contiguous ascending range of layers, "
                                               r"got \[3, 5\]"):
        InstructionGatedFuser(8, groups=[[1, 2], [3, 5]])
    with pytest.raises(ValueError, match=where + r"groups\[0\] expected a contiguous ascending range of layers, "
                                               r"got \[2, 1\]"):
        InstructionGatedFuser(8, groups=[[2, 1]])
    with pytest.raises(ValueError, match=where + r"groups\[0\] expected hidden-state indices >= 0 \(0 = embedding "
                                               r"output, k = block k\), got \[-3, -2\]"):
        InstructionGatedFuser(8, groups=[[-3, -2]])
    with pytest.raises(ValueError, match=where + r"layer 2 is in groups\[0\] and groups\[1\]; groups must not overlap"):
        InstructionGatedFuser(8, groups=[[1, 2], [2, 3]])
    with pytest.raises(ValueError, match=where + r"groups\[1\] is empty"):
        InstructionGatedFuser(8, groups=[[1], []])
    with pytest.raises(TypeError, match=where + r"groups expected a non-empty sequence of index ranges, got \[\]"):
        InstructionGatedFuser(8, groups=[])
    with pytest.raises(TypeError, match=where + r"groups\[0\] expected a sequence of ints \(hidden-state indices\)"):
        InstructionGatedFuser(8, groups=[[1.0, 2.0]])
    with pytest.raises(TypeError, match=where + r"base_layer expected an int hidden-state index, got '23'"):
        InstructionGatedFuser(8, base_layer="23")
    with pytest.raises(ValueError, match=where + r"zero_init_head and summary_norm configure the gate; gated=False "
                                               r"has no gate"):
        InstructionGatedFuser(8, gated=False, zero_init_head=True)
    with pytest.raises(ValueError, match=r"InstructionGate: num_heads=5 must divide dim=12"):
        InstructionGatedFuser(8, gate_dim=12, num_heads=5)
    with pytest.raises(ValueError, match=r"InstructionGatedFuser: dim expected a positive int, got 0"):
        InstructionGatedFuser(0)


def test_summary_norm_option():
    fuser = small_fuser(summary_norm=True)
    assert "summary_norm.weight" in fuser.gate.state_dict()
    feats, text = small_inputs(fuser)
    feats = [f * 100 for f in feats]
    out = fuser.forward_with_weights(feats, text=text)
    assert bool(torch.isfinite(out.weights).all())
    assert "summary_norm=True" in repr(fuser.gate)


def test_save_load_round_trip(tmp_path):
    fuser = small_fuser(summary_norm=True, zero_init_head=True)
    with torch.no_grad():
        fuser.gate.linear.weight.normal_()
    fuser.save_pretrained(tmp_path / "fuser")
    loaded = InstructionGatedFuser.from_pretrained(tmp_path / "fuser")
    assert loaded.get_config() == fuser.get_config()
    feats, text = small_inputs(fuser)
    assert torch.equal(loaded(feats, text=text), fuser(feats, text=text))
    module = FusionProjector(small_fuser(gated=False), Projector("mlp2x_gelu", 16, 10),
                             layers=(1, 2, 3, 4, 5, 6, -2), tokens="cls_patch")
    module.save_pretrained(tmp_path / "pipeline")
    again = FusionProjector.from_pretrained(tmp_path / "pipeline")
    assert again.layers == module.layers
    assert again.tokens == "cls_patch"
    assert torch.equal(again(feats), module(feats))


def test_repr():
    text = repr(small_fuser())
    assert "groups=[1..2, 3..5, 6..6], base_layer=-2, has_cls=True, gated=True" in text
    assert "num_blocks=2, num_heads=3, zero_init_head=False" in text


def test_entropy_loss():
    uniform = torch.full((3, 4), 0.25)
    torch.testing.assert_close(gate_entropy_loss(uniform), torch.tensor(-math.log(4)))
    one_hot = torch.tensor([[1.0, 0.0, 0.0]])
    assert gate_entropy_loss(one_hot).item() == 0.0
    w = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=torch.float64)
    expected = (w * w.log()).sum(-1).mean()
    torch.testing.assert_close(gate_entropy_loss(w), expected)
    assert gate_entropy_loss(w).dtype == torch.float64
    assert gate_entropy_loss(w.to(torch.bfloat16)).dtype == torch.float32
    # the authors' double softmax squashes the distribution toward uniform: a different, weaker loss
    double = gate_entropy_loss(w.softmax(-1))
    assert double < gate_entropy_loss(w)


def test_entropy_loss_trains_the_gate_toward_uniform():
    fuser = small_fuser()
    feats, text = small_inputs(fuser)
    out = fuser.forward_with_weights(feats, text=text)
    gate_entropy_loss(out.weights).backward()
    grads = [p.grad for p in fuser.gate.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert fuser.gate.linear.weight.grad.abs().sum() > 0


def test_entropy_loss_bad_input():
    with pytest.raises(ValueError, match=r"gate_entropy_loss: weights expected a floating-point \(B, K\) tensor, "
                                         r"got shape \(4,\) and dtype torch.float32"):
        gate_entropy_loss(torch.ones(4))
    with pytest.raises(TypeError, match=r"gate_entropy_loss: weights expected a torch.Tensor \(B, K\), got list"):
        gate_entropy_loss([[0.5, 0.5]])
