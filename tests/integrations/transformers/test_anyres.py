import pytest
import torch

import hf_tiny
from hf_tiny import IMAGE, IMAGE_TOKEN, PAD
from layerfuse import LayerTap

transformers = pytest.importorskip("transformers")
integration = pytest.importorskip("layerfuse.integrations.transformers")

PINPOINTS = [[16, 32], [32, 16], [32, 32]]


def next_model(cls_name="LlavaNext"):
    vision, text = hf_tiny.configs()
    config = getattr(transformers, f"{cls_name}Config")(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, image_grid_pinpoints=PINPOINTS,
    )
    return getattr(transformers, f"{cls_name}ForConditionalGeneration")(config).eval()


def per_crop_reference(model, module, pixel_values, crops):
    """Each crop through the tap and the fusion projector alone, then the stock anyres packing."""
    per_image = []
    for pix, n in zip(pixel_values, crops):
        rows = []
        for crop in pix[:n]:
            with LayerTap(model.model.vision_tower, module.layers, tokens=module.tokens) as tap:
                rows.append(module(tap(crop[None])))
        per_image.append(torch.cat(rows))
    return per_image


@pytest.mark.parametrize("family", ["mmfuser", "dci"])
def test_llava_next_anyres_crops_equal_a_per_crop_reference(family):
    module = hf_tiny.fusion_projector(family)
    model = integration.fuse_llava(next_model(), module)
    image_sizes = torch.tensor([[32, 16], [32, 32]])  # 1 + 2 and 1 + 4 crops
    crops = model.model.crop_counts(image_sizes)
    assert crops == [3, 5]
    pixel_values = torch.randn(2, 5, 3, IMAGE, IMAGE)
    with torch.no_grad():
        got = model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes).pooler_output
        reference = per_crop_reference(model, module, pixel_values, crops)
        packed, _ = model.model.pack_image_features(
            reference, image_sizes, vision_feature_select_strategy="default", image_newline=model.model.image_newline
        )
        for a, b in zip(got, packed):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        # the whole model: one prompt per image with as many placeholders as packed tokens
        lengths = [int(p.shape[0]) for p in got]
        ids = torch.full((2, max(lengths) + 4), PAD)
        mask = torch.zeros_like(ids)
        for row, n in enumerate(lengths):
            ids[row, -(n + 4):] = torch.tensor([5] * 2 + [IMAGE_TOKEN] * n + [6] * 2)
            mask[row, -(n + 4):] = 1
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_sizes=image_sizes,
                             max_new_tokens=3, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    assert out.shape == (2, ids.shape[1] + 3)


def test_llava_next_refuses_a_fuser_that_changes_the_token_count():
    model = integration.fuse_llava(next_model(), hf_tiny.fusion_projector("token_concat_1d"))
    with pytest.raises(ValueError, match="anyres packing lays each crop's tokens out on the 4x4 patch grid"):
        model.get_image_features(pixel_values=torch.randn(1, 3, 3, IMAGE, IMAGE), image_sizes=torch.tensor([[32, 16]]))


def test_llava_onevision_images_and_videos_go_through_the_fusion():
    module = hf_tiny.fusion_projector("cross_attention")
    model = integration.fuse_llava(next_model("LlavaOnevision"), module)
    image_sizes = torch.tensor([[16, 32]])
    pixel_values = torch.randn(1, 3, 3, IMAGE, IMAGE)
    with torch.no_grad():
        got = model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes).pooler_output
        reference = per_crop_reference(model, module, pixel_values, [3])
        packed, _ = model.model.pack_image_features(reference, image_sizes, image_newline=model.model.image_newline)
        torch.testing.assert_close(got[0], packed[0], rtol=1e-5, atol=1e-6)
        video = torch.randn(1, 2, 3, IMAGE, IMAGE)
        frames = model.get_video_features(pixel_values_videos=video).pooler_output
        expected = model.model.apply_pooling(torch.cat(per_crop_reference(model, module, video, [2])).reshape(2, 16, -1))
    torch.testing.assert_close(frames[0, :-1], expected.reshape(-1, expected.shape[-1]), rtol=1e-5, atol=1e-6)
    assert isinstance(model, integration.LayerfuseLlavaOnevisionForConditionalGeneration)
