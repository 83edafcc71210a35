"""The LLaVA drop-in builder and tower on their own (no ``llava`` package needed)."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fixture_utils import assert_fixture_close, load_fixture
from layerfuse import LayerFeatures, from_official
from layerfuse.integrations.llava import (
    IdentityMap,
    LayerfuseVisionTower,
    LlavaFusionProjector,
    build_vision_projector,
    build_vision_tower,
    fusion_types,
    patch,
    save_mm_adapter,
)
from layerfuse.presets import build_fusion_projector, preset_names

transformers = pytest.importorskip("transformers")

DEPTH, WIDTH, LLM_WIDTH = 6, 32, 48


def config(projector_type: str, **extra) -> SimpleNamespace:
    fields = {
        "mm_projector_type": projector_type, "mm_hidden_size": WIDTH, "hidden_size": LLM_WIDTH,
        "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
    }
    return SimpleNamespace(**{**fields, **extra})


def clip_config(depth: int = DEPTH):
    return transformers.CLIPVisionConfig(
        hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=depth, num_attention_heads=4, image_size=32,
        patch_size=8,
    )


def siglip_config():
    return transformers.SiglipVisionConfig(
        hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=DEPTH, num_attention_heads=4, image_size=32,
        patch_size=8,
    )


def llava_get_w(weights: dict, keyword: str = "mm_projector") -> dict:
    """LLaVA's ``initialize_vision_modules`` key stripping for ``--pretrain_mm_mlp_adapter``, verbatim."""
    return {k.split(keyword + ".")[1]: v for k, v in weights.items() if keyword in k}


@pytest.mark.parametrize(
    ("projector_type", "expected"),
    [("linear", ["weight", "bias"]), ("mlp2x_gelu", ["0.weight", "0.bias", "2.weight", "2.bias"]),
     ("mlp3x_gelu", ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]), ("identity", [])],
)
def test_stock_types_are_llavas_modules(projector_type, expected):
    module = build_vision_projector(config(projector_type))
    assert list(module.state_dict()) == expected
    x = torch.randn(2, 5, WIDTH)
    if projector_type == "identity":
        assert isinstance(module, IdentityMap)
        assert module(x) is x
        assert module.config == {"mm_projector_type": "identity"}
    else:
        assert module(x).shape == (2, 5, LLM_WIDTH)
    assert build_vision_projector(SimpleNamespace(mm_hidden_size=3, hidden_size=4)).in_features == 3  # default linear


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_builds_for_the_stated_depth(name):
    depth = 24
    cfg = config(name)
    module = build_vision_projector(cfg, vision_depth=depth)
    assert isinstance(module, LlavaFusionProjector)
    reference = build_fusion_projector(name, dim=WIDTH, llm_dim=LLM_WIDTH, depth=depth)
    assert module.layers == tuple(k % (depth + 1) for k in reference.layers)
    assert module.fuser.get_config() == reference.fuser.get_config()
    assert cfg.mm_layerfuse["depth"] == depth
    json.dumps(cfg.mm_layerfuse)  # lands in config.json


def test_recorded_config_rebuilds_the_same_module_without_the_tower():
    cfg = config("mmfuser+linear", mm_mmfuser_heads=4, mm_mmfuser_points=2)
    first = build_vision_projector(cfg, vision_depth=24)
    assert first.layers == (3, 8, 13, 18, 23)
    assert first.projector.kind == "linear"
    assert (first.fuser.heads, first.fuser.points) == (4, 2)
    saved = json.loads(json.dumps(vars(cfg)))  # what config.json holds
    again = build_vision_projector(SimpleNamespace(**saved))  # no depth, no tower: the record suffices
    assert again.get_config() == first.get_config()
    again.load_state_dict(first.state_dict())


def test_mmfuser_layers_at_other_depths_keep_the_penultimate_query():
    assert build_vision_projector(config("mmfuser"), vision_depth=27).layers == (3, 9, 14, 20, 26)
    assert build_vision_projector(config("mmfuser"), vision_depth=DEPTH).layers == (0, 2, 3, 4, 5)


def test_layerfuse_dir(tmp_path):
    saved = build_fusion_projector("lin_ed_18", dim=WIDTH, llm_dim=LLM_WIDTH, depth=DEPTH)
    nn.init.normal_(saved.projector[0].weight)
    saved.save_pretrained(tmp_path / "fused")
    cfg = config(f"layerfuse:{tmp_path / 'fused'}")
    module = build_vision_projector(cfg, vision_depth=DEPTH)
    assert module.layers == saved.layers
    assert torch.equal(module.projector[0].weight, saved.projector[0].weight)
    tower = LayerfuseVisionTower(clip_config(), cfg)
    assert tower.tap.resolved_layers == module.layers
    with pytest.raises(ValueError, match="LLM hidden_size is 7"):
        build_vision_projector(SimpleNamespace(**{**vars(config(cfg.mm_projector_type)), "hidden_size": 7}),
                               vision_depth=DEPTH)


@pytest.mark.parametrize("projector_type", ["mmfuser", "dense_connector_sti", "lin_ed_3_18_23", "comm_clip"])
def test_tower_feeds_the_projector_and_stops_early(projector_type):
    cfg = config(projector_type)
    tower = build_vision_tower(SimpleNamespace(**vars(cfg), mm_vision_tower=clip_config()))
    module = build_vision_projector(SimpleNamespace(**vars(cfg), mm_vision_tower=clip_config()))
    deepest = max(module.layers)
    ran = []
    handles = [block.register_forward_pre_hook(lambda *a, i=i: ran.append(i))
               for i, block in enumerate(tower.tap.backbone.blocks)]
    images = torch.randn(2, 3, 32, 32)
    features = tower(images)
    for h in handles:
        h.remove()
    assert ran == list(range(deepest))  # blocks after the deepest tapped layer never run
    assert isinstance(features, LayerFeatures)
    assert features.grid == (4, 4)
    assert features.layers == module.layers
    hidden = tower.vision_tower(images, output_hidden_states=True).hidden_states
    for k, f in zip(module.layers, features):
        assert torch.equal(f, hidden[k][:, 1:])  # CLIP: CLS dropped
    assert module(features).shape[-1] == LLM_WIDTH


def test_siglip_tower_keeps_every_patch():
    tower = LayerfuseVisionTower(siglip_config(), config("dense_connector_dci"))
    images = torch.randn(1, 3, 32, 32)
    features = tower(images)
    hidden = tower.vision_tower(images, output_hidden_states=True).hidden_states
    assert features.layers == (0, 1, 2, 3, 4, 5)
    for k, f in zip(features.layers, features):
        assert torch.equal(f, hidden[k])  # 16 of 16 tokens: no real patch dropped
    stock = LayerfuseVisionTower(siglip_config(), config("mlp2x_gelu"))
    stock.vision_tower.load_state_dict(tower.vision_tower.state_dict())
    assert torch.equal(stock(images), hidden[-2])
    assert stock.num_patches == 16
    assert type(stock.image_processor).__name__.startswith("SiglipImageProcessor")


def test_tower_interface_and_dtype():
    vit = transformers.CLIPVisionModel(clip_config())
    tower = LayerfuseVisionTower(vit, config("mlp2x_gelu"))
    assert tower.vision_tower is vit
    assert not any(p.requires_grad for p in tower.parameters())
    assert (tower.hidden_size, tower.num_patches, tower.num_patches_per_side) == (WIDTH, 16, 4)
    assert tower.dummy_feature.shape == (1, WIDTH)
    out = tower(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert out.dtype == torch.float64  # cast back to the images' dtype, as LLaVA's tower
    assert out.shape == (2, 16, WIDTH)
    assert [t.shape for t in tower([torch.randn(3, 32, 32)] * 2)] == [(1, 16, WIDTH)] * 2
    assert next(iter(tower.state_dict())).startswith("vision_tower.")
    delayed = LayerfuseVisionTower(clip_config(), config("mmfuser"), delay_load=True)
    assert not delayed.is_loaded
    assert delayed.hidden_size == WIDTH
    delayed.load_model()
    assert delayed.tap.resolved_layers == (0, 2, 3, 4, 5)
    with pytest.raises(ValueError, match="CLIP or SigLIP"):
        LayerfuseVisionTower(transformers.ViTConfig(), config("mmfuser"))


def test_dense_connector_checkpoint_loads_by_authors_keys():
    for name in ("dense_connector_dci", "dense_connector_dci_siglip"):
        fx = load_fixture(name)
        siglip = fx.config["tower"] == "siglip"
        cfg = SimpleNamespace(
            mm_projector_type="dense_connector_dci", mm_hidden_size=16, hidden_size=24,
            mm_vision_tower="google/siglip-so400m-patch14-384" if siglip else "openai/clip-vit-large-patch14-336",
        )
        module = build_vision_projector(cfg, vision_depth=27 if siglip else 24).double()
        adapter = fx.checkpoint("model.mm_projector.")
        module.load_state_dict(llava_get_w(adapter))
        hidden = fx.hidden_states()
        feats = LayerFeatures([hidden[k] if siglip else hidden[k][:, 1:] for k in module.layers], grid=(5, 5),
                              layers=module.layers)
        assert_fixture_close(module(feats), fx["output"], name=name)


def test_lin_ed_checkpoint_through_save_mm_adapter(tmp_path):
    fx = load_fixture("lin_ed_3-18-23")
    official = from_official("lin_ed", fx.checkpoint(), strategy="3-18-23", tower="clip")
    path = save_mm_adapter(official, tmp_path / "mm_projector.bin")
    module = build_vision_projector(
        SimpleNamespace(mm_projector_type="lin_ed_3_18_23", mm_hidden_size=16, hidden_size=24), vision_depth=24
    ).double()
    module.load_state_dict(llava_get_w(torch.load(path)))
    hidden = fx.hidden_states()
    feats = LayerFeatures([hidden[k][:, 1:] for k in module.layers], grid=(5, 5), layers=module.layers)
    assert_fixture_close(module(feats), fx["output"], name="lin_ed_3-18-23")


def test_authors_checkpoint_of_another_shape_is_refused():
    fx = load_fixture("dense_connector_dci")
    module = build_vision_projector(
        SimpleNamespace(mm_projector_type="dense_connector_dci", mm_hidden_size=16, hidden_size=24), vision_depth=12
    )
    with pytest.raises(ValueError, match="describes ConcatFuser"):
        module.load_state_dict(fx.with_prefix("param."))


def test_errors():
    with pytest.raises(ValueError, match="IGVA"):
        build_vision_projector(config("igva"), vision_depth=24)
    with pytest.raises(ValueError, match=r"Unknown projector type: 'mlp_gelu'.*'mmfuser'"):
        build_vision_projector(config("mlp_gelu"))
    with pytest.raises(ValueError, match="after '\\+'"):
        build_vision_projector(config("mmfuser+resampler"), vision_depth=24)
    with pytest.raises(ValueError, match="vision_depth="):
        build_vision_projector(config("mmfuser"))
    with pytest.raises(ValueError, match="cls_patch"):
        build_vision_projector(config("mmfuser", mm_vision_select_feature="cls_patch"), vision_depth=24)
    with pytest.raises(ValueError, match="mm_vision_select_feature"):
        build_vision_projector(config("lin_ed_18", mm_vision_select_feature="cls"), vision_depth=24)
    module = build_vision_projector(config("lin_ed_18"), vision_depth=24)
    with pytest.raises(TypeError, match="stock vision tower"):
        module(torch.randn(1, 4, WIDTH))
    with pytest.raises(ValueError, match=r"expected hidden states \[18, 23\]"):
        module(LayerFeatures([torch.randn(1, 4, WIDTH)] * 2, grid=(2, 2), layers=(17, 23)))
    assert "mmfuser" in fusion_types()


def test_cls_patch_for_token_wise_fusers():
    cfg = config("lin_ed_18", mm_vision_select_feature="cls_patch")
    module = build_vision_projector(cfg, vision_depth=DEPTH)
    tower = LayerfuseVisionTower(clip_config(), cfg)
    features = tower(torch.randn(1, 3, 32, 32))
    assert module.tokens == "cls_patch"
    assert features[0].shape == (1, 17, WIDTH)
    assert module(features).shape == (1, 17, LLM_WIDTH)


def test_patch_without_llava_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "llava", None)
    with pytest.raises(ImportError, match="pip install llava-torch --no-deps"):
        patch()
