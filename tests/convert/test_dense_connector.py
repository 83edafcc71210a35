import pytest
import torch

from fixture_utils import assert_fixture_close, load_fixture, tap_fixture
from layerfuse import ConcatFuser, FusionProjector, TokenConcatFuser, from_official

FIXTURES = ["dense_connector_sti", "dense_connector_sci", "dense_connector_dci", "dense_connector_dci_siglip"]


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_parity(name):
    fx = load_fixture(name)
    module = from_official(
        "dense_connector", fx.checkpoint(), variant=fx.config["connector"], tower=fx.config["tower"]
    )
    assert next(module.parameters()).dtype == torch.float64
    feats = tap_fixture(fx, module.layers, module.tokens)
    fused = module.fuser(feats)
    assert_fixture_close(fused, fx["projector_input"], name=f"{name}: projector_input")
    out = module(feats)
    assert_fixture_close(out, fx["output"], name=f"{name}: output")
    (out * fx["upstream"]).sum().backward()
    for key, grad in fx.with_prefix("grad.param.").items():
        assert_fixture_close(module.projector.get_parameter(key).grad, grad, name=f"{name}: grad {key}")


def test_layers_as_coded():
    sd = {"model.mm_projector.0.weight": torch.zeros(8, 12), "model.mm_projector.0.bias": torch.zeros(8)}
    dci = from_official("dense_connector", sd, variant="dci", tower="clip")
    assert sorted(dci.layers) == list(range(24))  # 0..23: block 24 is never used
    assert [[dci.layers[i] for i in g] for g in dci.fuser.terms] == [[23], list(range(12)), list(range(12, 24))]
    siglip = from_official("dense_connector", sd, variant="dci", tower="siglip")
    assert [[siglip.layers[i] for i in g] for g in siglip.fuser.terms] == [
        [26], list(range(13)), list(range(13, 26))
    ]
    sci = from_official("dense_connector", sd, variant="sci", tower="clip")
    assert sci.layers == (23, 7, 15)
    assert sci.tokens == "patch"
    assert isinstance(sci.fuser, ConcatFuser)
    assert sci.projector.kind == "linear"
    sd1 = {"mm_projector.0.weight": torch.zeros(8, 4), "mm_projector.0.bias": torch.zeros(8)}
    sti = from_official("dense_connector", sd1, variant="sti", tower="siglip")
    assert sti.layers == (26, 7, 15)
    assert isinstance(sti.fuser, TokenConcatFuser)


def test_prefixes_and_bf16_upcast():
    fx = load_fixture("dense_connector_sci")
    params = fx.with_prefix("param.")
    for prefix in ("model.mm_projector.", "base_model.model.model.mm_projector.", "mm_projector."):
        sd = {prefix + k: v.to(torch.bfloat16) for k, v in params.items()}
        sd["model.embed_tokens.weight"] = torch.zeros(3, 3)  # other keys are ignored
        module = from_official("dense_connector", sd, variant="sci", tower="clip")
        assert next(module.parameters()).dtype == torch.float32
        assert torch.equal(module.projector[0].weight, params["0.weight"].to(torch.bfloat16).float())


def test_explicit_dtype_builds_before_loading():
    fx = load_fixture("dense_connector_dci")
    sd = fx.checkpoint()
    module = from_official("dense_connector", sd, dtype=torch.float64, variant="dci", tower="clip")
    assert torch.equal(module.projector[2].weight, sd["model.mm_projector.2.weight"])
    half = from_official("dense_connector", sd, dtype=torch.float16, variant="dci", tower="clip")
    assert half.projector[0].weight.dtype == torch.float16


def test_errors():
    fx = load_fixture("dense_connector_sci")
    sd = fx.checkpoint()
    with pytest.raises(ValueError, match="convert_dense_connector: tower is required"):
        from_official("dense_connector", sd, variant="sci")
    with pytest.raises(ValueError, match="convert_dense_connector: variant expected one of 'sti', 'sci', 'dci'"):
        from_official("dense_connector", sd, variant="xyz", tower="clip")
    with pytest.raises(ValueError, match="convert_dense_connector: tower expected one of 'clip', 'siglip'"):
        from_official("dense_connector", sd, tower="dino")
    with pytest.raises(ValueError, match=r"no key contains 'mm_projector.'"):
        from_official("dense_connector", {"model.mm_projector_f.0.weight": torch.zeros(2, 3)}, tower="clip")
    extra = dict(sd, **{"model.mm_projector.4.weight": torch.zeros(24, 24)})
    with pytest.raises(ValueError, match="missing keys"):
        from_official("dense_connector", extra, variant="sci", tower="clip")
    bad = dict(sd, **{"model.mm_projector.0.weight": torch.zeros(24, 47)})
    with pytest.raises(ValueError, match="47 input columns, expected 3 x the ViT width"):
        from_official("dense_connector", bad, variant="sci", tower="clip")
    no_bias = {k: v for k, v in sd.items() if k != "model.mm_projector.2.bias"}
    with pytest.raises(ValueError, match=r"(?s)under mm_projector.\): .*nothing was loaded.*missing keys \(1\): 2.bias"):
        from_official("dense_connector", no_bias, variant="sci", tower="clip")


def test_file_round_trip(tmp_path):
    fx = load_fixture("dense_connector_sti")
    torch.save(fx.checkpoint(), tmp_path / "mm_projector.bin")
    module = from_official("dense_connector", tmp_path / "mm_projector.bin", variant="sti", tower="clip")
    module.save_pretrained(tmp_path / "saved")
    again = FusionProjector.from_pretrained(tmp_path / "saved")
    feats = tap_fixture(fx, again.layers, again.tokens)
    assert torch.equal(again(feats), module(feats))
    assert again.layers == module.layers
    assert again.tokens == module.tokens
