"""DeepStack attached to transformers' own Qwen3-VL (tiny config) reproduces its logits exactly."""

from __future__ import annotations

import pytest
import torch

from layerfuse.internal import DeepStack, PatchMerger, window_order

pytest.importorskip("transformers")

IMAGE, START, END = 90, 91, 92


def _model():
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = Qwen3VLConfig(
        text_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 8, "vocab_size": 96, "max_position_embeddings": 256, "pad_token_id": 0,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                             "mrope_interleaved": True},
        },
        vision_config={
            "depth": 4, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "patch_size": 4, "temporal_patch_size": 2,
            "spatial_merge_size": 2, "out_hidden_size": 32, "num_position_embeddings": 64, "deepstack_visual_indexes": [0, 1, 3],
        },
        image_token_id=IMAGE, vision_start_token_id=START, vision_end_token_id=END, video_token_id=93,
    )
    return Qwen3VLForConditionalGeneration(config).eval()


def _image(tokens: int) -> list[int]:
    return [START] + [IMAGE] * tokens + [END]


def _batch(layout: str):
    """input_ids, attention_mask and image grids; left padding as batched generation uses."""
    if layout == "one_image_each":
        grids = [[1, 4, 4], [1, 4, 6]]  # 4 and 6 image tokens
        rows = [[5, *_image(4), 7, 8], [5, 6, *_image(6), 7]]
    else:  # several images of different lengths in sample 0, none in sample 1
        grids = [[1, 4, 4], [1, 4, 6]]
        rows = [[5, *_image(4), 9, *_image(6), 7], [5, 6, 7, 8, 9]]
    length = max(map(len, rows))
    ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    grid = torch.tensor(grids)
    pixel_values = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 4 * 4)
    return {
        "input_ids": ids, "attention_mask": attention_mask, "pixel_values": pixel_values, "image_grid_thw": grid,
        "mm_token_type_ids": (ids == IMAGE).long(),
    }


def _deepstack_for(model) -> tuple[DeepStack, dict[int, torch.Tensor]]:
    """A DeepStack with the model's merger weights, the model's own DeepStack switched off, and hooks that
    capture the tapped vision-block outputs (what a tap of the packed tower returns)."""
    visual = model.model.visual
    indexes = list(visual.deepstack_visual_indexes)
    fusion = DeepStack(visual.config.hidden_size, model.config.text_config.hidden_size, num_levels=len(indexes))
    for ours, theirs in zip(fusion.mergers, visual.deepstack_merger_list):
        ours.load_state_dict(theirs.state_dict())
    captured: dict[int, torch.Tensor] = {}
    for k in indexes:
        visual.blocks[k].register_forward_hook(lambda m, a, out, k=k: captured.__setitem__(k, out))
    visual.deepstack_visual_indexes = []
    return fusion.attach(model), captured


@pytest.mark.parametrize("layout", ["one_image_each", "two_images_and_none"])
def test_deepstack_equals_qwen3_vl_prefill_and_greedy_generate(layout):
    torch.manual_seed(0)
    model = _model()
    inputs = _batch(layout)
    with torch.no_grad():
        expected = model(**inputs).logits
        expected_tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    indexes = list(model.model.visual.deepstack_visual_indexes)
    fusion, captured = _deepstack_for(model)
    mask = inputs["input_ids"] == IMAGE
    with torch.no_grad():
        model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        levels = [captured[k] for k in indexes]
        with fusion.inject(levels, mask):
            logits = model(**inputs).logits
            tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        without = model(**inputs).logits
    assert torch.equal(logits, expected)
    assert torch.equal(tokens, expected_tokens)
    assert not torch.equal(without, expected)  # the model's own DeepStack really is off
    fusion.detach()


def test_patch_merger_loads_qwen3_vl_weights_and_window_order_matches_raster():
    model = _model()
    theirs = model.model.visual.deepstack_merger_list[0]
    ours = PatchMerger(16, 32)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(24, 16)
    assert torch.equal(ours(x), theirs(x))
    raster = torch.randn(2, 4 * 6, 16)
    windows = window_order(raster, (4, 6))
    # window (0, 1) holds raster rows 0..1, columns 2..3
    assert torch.equal(windows[:, 4:8], raster[:, [2, 3, 8, 9]])
