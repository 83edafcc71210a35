"""The contract every parameter-light fuser keeps: serialisation, factory kwargs, dtypes, compile."""

import pytest
import torch

from layerfuse import ConcatFuser, Fuser, FusionProjector, Projector, TokenConcatFuser, WeightedSumFuser

C = 8
BUILDERS = {
    "concat": lambda **dd: ConcatFuser([C] * 3, terms=[2, [0, 1]], **dd),
    "concat_norm": lambda **dd: ConcatFuser([C] * 3, norm=True, drop_first_token=True, **dd),
    "token_1d": lambda **dd: TokenConcatFuser(C, 3, window=4, **dd),
    "token_2d": lambda **dd: TokenConcatFuser(C, 3, pool="2d", window=(2, 2), grid=(3, 4), **dd),
    "weighted_softmax": lambda **dd: WeightedSumFuser(C, 3, init_weights=[0.2, 0.3, 0.5], **dd),
    "weighted_lln": lambda **dd: WeightedSumFuser(C, 3, normalize="none", layer_proj=True, layer_proj_dim=5, **dd),
}


def _feats(dtype=torch.float32):
    return [torch.randn(2, 12, C, dtype=dtype) for _ in range(3)]


def _randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


@pytest.mark.parametrize("name", BUILDERS)
def test_save_load_round_trip_is_exact(name, tmp_path):
    fuser = _randomise(BUILDERS[name]())
    fuser.save_pretrained(tmp_path / name)
    again = Fuser.from_pretrained(tmp_path / name)
    assert type(again) is type(fuser)
    assert again.get_config() == fuser.get_config()
    assert repr(again) == repr(fuser)
    feats = _feats()
    assert torch.equal(again(feats), fuser(feats))
    for (k, a), (k2, b) in zip(fuser.state_dict().items(), again.state_dict().items()):
        assert k == k2
        assert torch.equal(a, b)
    twice = type(fuser).from_pretrained(tmp_path / name, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in twice.parameters())


@pytest.mark.parametrize("name", BUILDERS)
def test_fusion_projector_round_trip(name, tmp_path):
    fuser = _randomise(BUILDERS[name]())
    module = FusionProjector(fuser, Projector("mlp2x_gelu", fuser.out_dim, 6), layers=(-2, 3, 5), tokens="patch")
    module.save_pretrained(tmp_path)
    again = FusionProjector.from_pretrained(tmp_path)
    assert again.layers == (-2, 3, 5)
    assert again.tokens == "patch"
    feats = _feats()
    assert torch.equal(again(feats), module(feats))


@pytest.mark.parametrize("name", BUILDERS)
def test_meta_device_and_reset(name):
    fuser = BUILDERS[name](device="meta", dtype=torch.float64)
    assert all(p.device.type == "meta" and p.dtype == torch.float64 for p in fuser.parameters())
    real = fuser.to_empty(device="cpu")
    real.reset_parameters()
    reference = BUILDERS[name](dtype=torch.float64)
    for (name_a, a), b in zip(real.named_parameters(), reference.parameters()):
        assert a.shape == b.shape
        if not name_a.startswith("proj_"):  # deterministic inits; the per-layer Linears are random
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", BUILDERS)
def test_dtypes(name, dtype):
    fuser = BUILDERS[name](dtype=dtype)
    out = fuser(_feats(dtype))
    assert out.dtype == dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", BUILDERS)
def test_autocast_bf16(name):
    fuser = BUILDERS[name]()
    module = FusionProjector(fuser, Projector("mlp2x_gelu", fuser.out_dim, 6), layers=(1, 2, 3))
    feats = [f.requires_grad_() for f in _feats(torch.bfloat16)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(feats)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    assert all(f.grad is not None for f in feats)


@pytest.mark.parametrize("name", ["concat_norm", "token_2d", "weighted_lln"])
def test_compile_fullgraph(name):
    torch._dynamo.reset()
    fuser = BUILDERS[name]()
    feats = _feats()
    compiled = torch.compile(fuser, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(feats), fuser(feats))


@pytest.mark.parametrize("name", ["concat", "token_1d", "weighted_softmax"])
def test_torch_export(name):
    fuser = _randomise(BUILDERS[name]())
    feats = _feats()
    exported = torch.export.export(fuser, (feats,))
    assert torch.equal(exported.module()(feats), fuser(feats))
