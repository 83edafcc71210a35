import pytest
import torch

from fixture_utils import assert_fixture_close, load_fixture, tap_fixture
from layerfuse import ConcatFuser, from_official

FIXTURES = ["lin_ed_18", "lin_ed_3-18-23", "lin_ed_former", "lin_ed_latter", "lin_ed_all", "lin_ed_3-18-23_siglip"]


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_parity(name):
    fx = load_fixture(name)
    module = from_official(
        "lin_ed", fx.checkpoint(), strategy=fx.config["layer_using_strategy"], tower=fx.config["tower"]
    )
    assert isinstance(module.fuser, ConcatFuser)
    assert next(module.parameters()).dtype == torch.float64
    assert set(module.layers) == set(fx.config["selected_list"])
    feats = tap_fixture(fx, module.layers, module.tokens)
    assert_fixture_close(module.fuser(feats), fx["projector_input"], name=f"{name}: projector_input")
    out = module(feats)
    assert_fixture_close(out, fx["output"], name=f"{name}: output")
    (out * fx["upstream"]).sum().backward()
    grads = fx.with_prefix("grad.param.mm_projector_f.")
    assert len(grads) == 4
    for key, grad in grads.items():
        assert_fixture_close(module.projector.get_parameter(key).grad, grad, name=f"{name}: grad {key}")


def test_siglip_drop_first_token_switch():
    fx = load_fixture("lin_ed_3-18-23_siglip")
    sd = fx.checkpoint()
    faithful = from_official("lin_ed", sd, strategy="3-18-23", tower="siglip")
    assert faithful.fuser.drop_first_token
    assert faithful.tokens == "patch"
    assert faithful.layers == (3, 20, 25)
    fixed = from_official("lin_ed", sd, strategy="3-18-23", tower="siglip", drop_first_token=False)
    feats = tap_fixture(fx, fixed.layers, fixed.tokens)
    out = fixed(feats)
    assert out.shape == (1, 25, 24)  # every SigLIP patch kept
    # the per-token projector gives the faithful tokens for patches 1.., plus the first patch
    assert_fixture_close(out[:, 1:], fx["output"], name="fixed vs faithful on shared patches")


def test_layers_as_coded():
    sd = {"model.mm_projector_f.0.weight": torch.zeros(8, 6), "model.mm_projector_f.0.bias": torch.zeros(8)}
    latter = from_official("lin_ed", sd, strategy="latter", tower="clip")
    blocks = [[latter.layers[i] for i in g] for g in latter.fuser.terms]
    assert blocks == [list(range(13, 25)), [23]]  # the group includes the final layer again
    sd3 = {"model.mm_projector_f.0.weight": torch.zeros(8, 9), "model.mm_projector_f.0.bias": torch.zeros(8)}
    everything = from_official("lin_ed", sd3, strategy="all", tower="clip")
    blocks = [[everything.layers[i] for i in g] for g in everything.fuser.terms]
    assert blocks == [list(range(1, 13)), list(range(13, 25)), [23]]
    siglip = from_official("lin_ed", sd, strategy="latter", tower="siglip")
    assert [[siglip.layers[i] for i in g] for g in siglip.fuser.terms] == [list(range(15, 27)), [25]]


def test_errors():
    sd = load_fixture("lin_ed_18").checkpoint()
    with pytest.raises(ValueError, match="strategy='3-18' builds no E_D projector"):
        from_official("lin_ed", sd, strategy="3-18")
    with pytest.raises(ValueError, match="convert_lin_ed: strategy expected one of '3-18-23', 'latter', got 'all'"):
        from_official("lin_ed", sd, strategy="all", tower="siglip")
    with pytest.raises(ValueError, match="drop_first_token=True is for SigLIP only"):
        from_official("lin_ed", sd, strategy="18", drop_first_token=True)
    with pytest.raises(ValueError, match="32 input columns, expected 3 x the ViT width"):
        from_official("lin_ed", sd, strategy="3-18-23")  # a 2-block checkpoint (16 * 2)
    with pytest.raises(ValueError, match=r"no key contains 'mm_projector_f.'"):
        from_official("lin_ed", {"model.mm_projector.0.weight": torch.zeros(2, 2)}, strategy="18")
    # mm_projectors.{i} (the I_* per-layer projectors) never leak into mm_projector_f
    noisy = dict(sd, **{"model.mm_projectors.1.0.weight": torch.zeros(2, 2)})
    assert from_official("lin_ed", noisy, strategy="18").projector.in_dim == 32
