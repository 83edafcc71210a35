import pytest
import torch

from layerfuse import ConcatFuser, FusionProjector, Projector, TokenConcatFuser
from layerfuse.convert import from_official, to_hf_llava

transformers = pytest.importorskip("transformers")

DIM, LLM = 16, 24


def _configs():
    vision = transformers.CLIPVisionConfig(
        hidden_size=DIM, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=42, patch_size=14
    )
    text = transformers.LlamaConfig(
        hidden_size=LLM, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=64,
    )
    return vision, text


def _module(layers, terms=None, norm=False, tokens="patch"):
    fuser = ConcatFuser([DIM] * len(layers), terms, norm=norm)
    if norm:
        with torch.no_grad():
            fuser.norm.weight.normal_()
            fuser.norm.bias.normal_()
    return FusionProjector(fuser, Projector("mlp2x_gelu", fuser.out_dim, LLM), layers=layers, tokens=tokens)


@pytest.mark.parametrize(("layers", "tokens"), [((1, 3, -2), "patch"), ((2, 0), "all"), ((-2,), "patch")])
def test_llava_image_features_match(layers, tokens):
    module = _module(layers, tokens=tokens).eval()
    export = to_hf_llava(module, vision_prefix_tokens=1)
    assert export.architecture == "LlavaForConditionalGeneration"
    vision, text = _configs()
    model = transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig(vision_config=vision, text_config=text, **export.config)
    ).eval()
    export.load_into(model)
    pixels = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        hf = torch.stack(model.model.get_image_features(pixels).pooler_output)
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        drop = 1 if tokens == "patch" else 0
        ours = module([hidden[k][:, drop:] for k in module.layers])
    assert hf.shape == (2, 9 + 1 - drop, LLM)
    torch.testing.assert_close(hf, ours, rtol=0, atol=1e-6)
    expected = list(layers) if len(layers) > 1 else layers[0]
    assert export.config["vision_feature_layer"] == expected
    assert set(export.state_dict()) == {f"model.multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}


def test_vip_llava_with_norm_matches():
    layers = (-2, -3, 1)
    module = _module(layers, norm=True).eval()
    export = to_hf_llava(module, vision_prefix_tokens=1)
    assert export.architecture == "VipLlavaForConditionalGeneration"
    vision, text = _configs()
    model = transformers.VipLlavaForConditionalGeneration(
        transformers.VipLlavaConfig(vision_config=vision, text_config=text, **export.config)
    ).eval()
    export.load_into(model)
    pixels = torch.randn(1, 3, 42, 42)
    with torch.no_grad():
        hf = model.model.get_image_features(pixels)
        hf = torch.stack(list(hf.pooler_output)) if hasattr(hf, "pooler_output") else hf
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        ours = module([hidden[k][:, 1:] for k in module.layers])
    torch.testing.assert_close(hf.reshape(ours.shape), ours, rtol=0, atol=1e-5)


def test_lin_siglip_drop_first_token_is_default_strategy():
    sd = {"model.mm_projector_f.0.weight": torch.randn(LLM, 3 * DIM), "model.mm_projector_f.0.bias": torch.randn(LLM),
          "model.mm_projector_f.2.weight": torch.randn(LLM, LLM), "model.mm_projector_f.2.bias": torch.randn(LLM)}
    module = from_official("lin_ed", sd, strategy="3-18-23", tower="siglip")
    export = to_hf_llava(module, vision_prefix_tokens=0)
    assert export.config["vision_feature_select_strategy"] == "default"  # HF also drops token 0
    assert export.config["vision_feature_layer"] == [3, 20, 25]
    fixed = from_official("lin_ed", sd, strategy="3-18-23", tower="siglip", drop_first_token=False)
    assert to_hf_llava(fixed, vision_prefix_tokens=0).config["vision_feature_select_strategy"] == "full"


def test_saved_directory(tmp_path):
    module = _module((1, 2))
    module.save_pretrained(tmp_path)
    export = to_hf_llava(tmp_path, vision_prefix_tokens=1)
    assert torch.equal(export.projector_state["linear_2.weight"], module.projector[2].weight)


def test_refusals():
    with pytest.raises(ValueError, match=r"group means .* cannot be exported"):
        to_hf_llava(_module((0, 1, 2), terms=[2, [0, 1]]), vision_prefix_tokens=1)
    token = FusionProjector(TokenConcatFuser(DIM, 2, window=2), Projector("mlp2x_gelu", DIM, LLM), layers=(1, 2))
    with pytest.raises(TypeError, match="a TokenConcatFuser cannot be expressed"):
        to_hf_llava(token, vision_prefix_tokens=1)
    linear = FusionProjector(ConcatFuser([DIM]), Projector("linear", DIM, LLM), layers=(1,))
    with pytest.raises(ValueError, match="got projector kind 'linear'"):
        to_hf_llava(linear, vision_prefix_tokens=1)
    with pytest.raises(ValueError, match="drops 2 leading tokens per layer"):
        to_hf_llava(_module((1, 2)), vision_prefix_tokens=2)
    module = _module((1, 3))
    export = to_hf_llava(module, vision_prefix_tokens=1)
    vision, text = _configs()
    model = transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=[1, 2])
    )
    with pytest.raises(ValueError, match=r"model.config.vision_feature_layer is \[1, 2\] but the export needs \[1, 3\]"):
        export.load_into(model)


def _siglip_llava(**export_config):
    vision = transformers.SiglipVisionConfig(
        hidden_size=DIM, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=16,
        patch_size=4, vision_use_head=False,
    )
    _, text = _configs()
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, **export_config)
    return transformers.LlavaForConditionalGeneration(config).eval()


def test_siglip_export_reads_the_prefix_tokens_from_the_tower_and_equals_the_pipeline():
    from layerfuse import LayerTap

    module = _module((1, 3, -2)).eval()
    tower = _siglip_llava().model.vision_tower
    export = to_hf_llava(module, vision_tower=tower)
    assert export.vision_prefix_tokens == 0
    assert export.config["vision_feature_select_strategy"] == "full"  # HF must not drop a patch
    model = _siglip_llava(**export.config)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    export.load_into(model)
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        hf = torch.stack(model.model.get_image_features(pixels).pooler_output)
        ours = module(LayerTap(model.model.vision_tower, module.layers, tokens=module.tokens)(pixels))
    assert hf.shape == ours.shape == (2, 16, LLM)
    torch.testing.assert_close(hf, ours, rtol=0, atol=1e-6)


def test_an_export_without_a_known_prefix_count_or_for_another_tower_is_refused():
    module = _module((1, 3))
    with pytest.raises(ValueError, match=r"pass vision_tower= .* or vision_prefix_tokens="):
        to_hf_llava(module)
    siglip = _siglip_llava(vision_feature_layer=[1, 3])
    with pytest.raises(ValueError, match=r"vision_prefix_tokens=1 but SiglipVisionModel has 0"):
        to_hf_llava(module, vision_tower=siglip.model.vision_tower, vision_prefix_tokens=1)
    clip_export = to_hf_llava(module, vision_prefix_tokens=1)  # made for CLIP: would drop a real SigLIP patch
    with pytest.raises(ValueError, match=r"vision tower \(SiglipVisionModel\) has 0 prefix token\(s\) but the export was made for 1"):
        clip_export.load_into(siglip)
