"""A fusion held by a real HF LLaVA model: attach to the host, feed a LayerTap of its own tower."""

from __future__ import annotations

import pytest
import torch

from layerfuse import LayerTap
from layerfuse.internal import InternalDirect, InternalFusion

pytest.importorskip("transformers")
IMAGE = 63


def _llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                       num_hidden_layers=4, image_size=16, patch_size=4),
        text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                vocab_size=64, pad_token_id=0),
        image_token_id=IMAGE, vision_feature_layer=-2,
    )
    return LlavaForConditionalGeneration(config).to(torch.float64).eval()


def test_fusion_inside_a_llava_host_with_a_tap_of_its_tower():
    torch.manual_seed(0)
    model = _llava()
    pixel_values = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ids = torch.tensor([[1, 2, *[IMAGE] * 16, 3, 4], [0, 0, 1, *[IMAGE] * 16, 5]])
    attention_mask = (ids != 0).long()
    inputs = {"input_ids": ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
    with torch.no_grad():
        plain = model(**inputs).logits
    text_keys = list(model.state_dict())

    fusion = InternalDirect(16, 32, [0, 2], dtype=torch.float64)
    model.internal_fusion = fusion  # the host registers it: its save_pretrained then holds the weights
    fusion.attach(model)  # finds model.model.language_model.layers
    assert [k for k in model.state_dict() if not k.startswith("internal_fusion.")] == text_keys
    assert {k for k in model.state_dict() if k.startswith("internal_fusion.")} == {
        f"internal_fusion.{k}" for k in fusion.state_dict()
    }

    with torch.no_grad(), LayerTap(model.model.vision_tower, [1, 3]) as tap:
        levels = tap(pixel_values)  # 2 x (2 images, 16 patches, 16)
    mask = ids == IMAGE
    with torch.no_grad():
        for p in fusion.parameters():
            p.zero_()
        with fusion.inject(levels, mask):
            assert torch.equal(model(**inputs).logits, plain)
            for p in fusion.parameters():
                p.normal_()
            fused = model(**inputs).logits
            generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert not torch.allclose(fused, plain)
    assert generated.shape == (2, ids.shape[1] + 3)
    rebuilt = InternalFusion.from_fusion_config(fusion.fusion_config(), dtype=torch.float64)
    rebuilt.load_state_dict({k[len("internal_fusion."):]: v for k, v in model.state_dict().items()
                             if k.startswith("internal_fusion.")})
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.parameters(), fusion.parameters()))
    fusion.detach()
