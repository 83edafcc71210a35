import pytest
import torch

from fixture_utils import assert_fixture_close, load_fixture
from layerfuse import FusionProjector, MMFuser, Projector, from_official
from layerfuse.convert.lin_strategies import lin_selected_layers


def authors_checkpoint(fuser: MMFuser, projector: Projector, prefix: str) -> dict[str, torch.Tensor]:
    """The authors' key layout: fuser at 0.*, projector Linears shifted by one (1.*, 3.*, ...)."""
    sd = {f"{prefix}0.{k}": v for k, v in fuser.state_dict().items()}
    for k, v in projector.state_dict().items():
        index, rest = k.split(".", 1)
        sd[f"{prefix}{int(index) + 1}.{rest}"] = v
    return sd


def small(levels: int = 2, kind: str = "mlp2x_gelu", heads: int = 2, points: int = 3):
    fuser = MMFuser(16, num_levels=levels, heads=heads, points=points)
    with torch.no_grad():
        for p in fuser.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return fuser, Projector(kind, 16, 24)


@pytest.mark.parametrize(
    ("prefix", "kind"),
    [("model.mm_projector.", "mlp2x_gelu"), ("base_model.model.model.mm_projector.", "linear"),
     ("mm_projector.", "mlp3x_gelu")],
)
def test_round_trip_any_prefix_and_projector(prefix, kind):
    fuser, projector = small(kind=kind)
    checkpoint = authors_checkpoint(fuser, projector, prefix)
    checkpoint["model.layers.0.mlp.up_proj.weight"] = torch.zeros(2, 2)  # the rest of the LLM is ignored
    checkpoint["model.mm_projector_f.0.gamma1"] = torch.zeros(3)  # so is a sibling projector
    module = from_official("mmfuser", checkpoint, heads=2, points=3, layers=[-12, -7, -2], grid=(2, 3))
    assert module.layers == (-12, -7, -2)
    assert module.tokens == "patch"
    assert module.projector.kind == kind
    assert module.fuser.grid == (2, 3)
    feats = [torch.randn(2, 6, 16) for _ in range(3)]
    torch.testing.assert_close(module(feats), projector(fuser(feats, grid=(2, 3))), rtol=0, atol=0)


def test_defaults_are_the_authors_clip_l_setting():
    fuser = MMFuser(32, num_levels=4, heads=16, points=4)
    module = from_official("mmfuser", authors_checkpoint(fuser, Projector("mlp2x_gelu", 32, 8), "model.mm_projector."))
    assert module.layers == (-22, -17, -12, -7, -2)
    assert module.fuser.get_config()["heads"] == 16
    assert module.fuser.num_levels == 4


def test_bf16_checkpoint_is_upcast_and_dtype_wins():
    fuser, projector = small()
    checkpoint = {k: v.bfloat16() for k, v in authors_checkpoint(fuser, projector, "model.mm_projector.").items()}
    options = {"heads": 2, "points": 3, "layers": [3, 8, 23]}
    assert next(from_official("mmfuser", checkpoint, **options).parameters()).dtype == torch.float32
    module = from_official("mmfuser", checkpoint, dtype=torch.float64, **options)
    assert next(module.parameters()).dtype == torch.float64
    assert torch.equal(module.fuser.gamma1, checkpoint["model.mm_projector.0.gamma1"].double())


def test_file_checkpoint(tmp_path):
    fuser, projector = small()
    torch.save(authors_checkpoint(fuser, projector, "model.mm_projector."), tmp_path / "mm_projector.bin")
    module = from_official("mmfuser", tmp_path / "mm_projector.bin", heads=2, points=3, layers=[1, 2, 3])
    assert torch.equal(module.fuser.cross_attn.value_proj.weight, fuser.cross_attn.value_proj.weight)


def test_heads_points_mismatch_is_reported():
    fuser, projector = small(heads=2, points=3)
    checkpoint = authors_checkpoint(fuser, projector, "model.mm_projector.")
    with pytest.raises(ValueError, match=r"convert_mmfuser: heads=16 x points=4 = 64 does not fit the checkpoint: "
                                         r"mm_projector\.0\.self_attn\.attention_weights\.weight has 6 rows"):
        from_official("mmfuser", checkpoint, layers=[1, 2, 3])
    # same product, different split: only the head width can tell, and here it cannot (16 % 3 != 0)
    with pytest.raises(ValueError, match=r"convert_mmfuser: heads=3 does not divide the fuser width 16"):
        from_official("mmfuser", checkpoint, heads=3, points=2, layers=[1, 2, 3])


def test_layers_must_match_the_levels():
    fuser, projector = small(levels=2)
    checkpoint = authors_checkpoint(fuser, projector, "model.mm_projector.")
    with pytest.raises(ValueError, match=r"convert_mmfuser: layers expected 3 hidden-state indices \(the checkpoint "
                                         r"has 2 value levels, then the query\), got \[-22, -17, -12, -7, -2\]"):
        from_official("mmfuser", checkpoint, heads=2, points=3)


def test_missing_and_unexpected_keys():
    fuser, projector = small()
    checkpoint = authors_checkpoint(fuser, projector, "model.mm_projector.")
    options = {"heads": 2, "points": 3, "layers": [1, 2, 3]}
    with pytest.raises(ValueError, match=r"convert_mmfuser: no key contains 'mm_projector\.'"):
        from_official("mmfuser", {"model.mm_projector_f.0.gamma1": torch.zeros(2)}, **options)
    dropped = {k: v for k, v in checkpoint.items() if not k.endswith("0.gamma2")}
    with pytest.raises(ValueError, match=r"nothing was loaded\.\nmissing keys \(1\): fuser\.gamma2"):
        from_official("mmfuser", dropped, **options)
    extra = {**checkpoint, "model.mm_projector.0.pos_embed": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): fuser\.pos_embed"):
        from_official("mmfuser", extra, **options)
    stray = {**checkpoint, "model.mm_projector.2.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"convert_mmfuser: unexpected keys \(1\): mm_projector\.2\.weight"):
        from_official("mmfuser", stray, **options)
    no_mlp = {k: v for k, v in checkpoint.items() if ".mm_projector.0." in k}
    with pytest.raises(ValueError, match=r"convert_mmfuser: missing keys: a LLaVA projector needs mm_projector\.1\.weight, "
                                         r"mm_projector\.3\.weight, \.\.\. without gaps; found none"):
        from_official("mmfuser", no_mlp, **options)
    gap = {k: v for k, v in checkpoint.items() if ".mm_projector.1." not in k}
    with pytest.raises(ValueError, match=r"without gaps; found mm_projector\.3\.bias, mm_projector\.3\.weight"):
        from_official("mmfuser", gap, **options)
    wide = {**checkpoint, "model.mm_projector.1.weight": torch.zeros(24, 32)}
    with pytest.raises(ValueError, match=r"mm_projector\.1\.weight takes 32 input channels but the fuser width is 16"):
        from_official("mmfuser", wide, **options)
    no_norm = {k: v for k, v in checkpoint.items() if "query_norm.weight" not in k}
    with pytest.raises(ValueError, match=r"missing keys \(1\): mm_projector\.0\.query_norm\.weight"):
        from_official("mmfuser", no_norm, **options)


def test_lin_em_reproduces_the_mmfuser_fixture_block():
    # Lin et al.'s E_M is the MMFuser block under mm_projector_f; two levels is their "3-18-23".
    fx = load_fixture("mmfuser_two_levels")
    checkpoint = fx.checkpoint("model.mm_projector_f.")
    checkpoint["model.mm_projectors.1.0.weight"] = torch.zeros(2, 2)  # I_* projectors are not E_M's
    module = from_official("lin_em", checkpoint, heads=4, points=2, grid=(5, 5))
    assert module.layers == (3, 18, 23)
    assert_fixture_close(module(fx.inputs()), fx["output"], name="output")


@pytest.mark.parametrize(
    ("strategy", "tower", "layers"),
    [
        ("18", "clip", (18, 23)),
        ("3-18-23", "clip", (3, 18, 23)),
        ("former", "clip", (*range(1, 13), 23)),
        ("latter", "clip", (*range(13, 25), 23)),
        ("all", "clip", (*range(1, 25), 23)),
        ("3-18-23", "siglip", (3, 20, 25)),
        ("latter", "siglip", (*range(15, 27), 25)),
    ],
)
def test_lin_em_strategies(strategy, tower, layers):
    fuser = MMFuser(8, num_levels=len(layers) - 1, heads=2, points=1)
    checkpoint = authors_checkpoint(fuser, Projector("mlp2x_gelu", 8, 12), "model.mm_projector_f.")
    module = from_official("lin_em", checkpoint, strategy=strategy, tower=tower, heads=2, points=1)
    assert isinstance(module, FusionProjector)
    assert module.layers == layers
    assert module.tokens == "patch"
    assert lin_selected_layers(strategy, tower, where="t", paradigm="E_M")[-1] == layers[-1]


def test_lin_em_bad_options():
    fuser = MMFuser(8, num_levels=2, heads=2, points=1)
    checkpoint = authors_checkpoint(fuser, Projector("mlp2x_gelu", 8, 12), "model.mm_projector_f.")
    with pytest.raises(ValueError, match=r"convert_lin_em: strategy='3-18' builds no E_M projector"):
        from_official("lin_em", checkpoint, strategy="3-18", heads=2, points=1)
    with pytest.raises(ValueError, match=r"convert_lin_em: strategy='latter' fuses 12 value levels but the checkpoint has 2"):
        from_official("lin_em", checkpoint, strategy="latter", heads=2, points=1)
    with pytest.raises(ValueError, match=r"convert_lin_em: strategy expected one of '3-18-23', 'latter', got 'all'"):
        from_official("lin_em", checkpoint, strategy="all", tower="siglip", heads=2, points=1)
    with pytest.raises(ValueError, match=r"convert_lin_em: tower expected one of 'clip', 'siglip', got 'dinov2'"):
        from_official("lin_em", checkpoint, tower="dinov2", heads=2, points=1)
    with pytest.raises(ValueError, match=r"convert_lin_em: no key contains 'mm_projector_f\.'"):
        from_official("lin_em", {"model.mm_projector.0.gamma1": torch.zeros(8)}, heads=2, points=1)
    with pytest.raises(ValueError, match=r"convert_lin_em: heads=16 x points=4 = 64 does not fit"):
        from_official("lin_em", checkpoint)
