"""Packed, variable-resolution towers: per-image grids, raster order, and equality with the tower's own states."""

from __future__ import annotations

import sys

import pytest
import torch
from einops import rearrange

from layerfuse import LayerFeatures, LayerTap

transformers = pytest.importorskip("transformers")

# Three images of different sizes (pixels): grids 4x6, 2x2 and 6x4 patches of 4 px.
SIZES = [(16, 24), (8, 8), (24, 16)]
PATCH, MERGE, TEMPORAL = 4, 2, 2


def _images(sizes=SIZES) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


def _qwen_inputs(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The Qwen2-VL image processor's own packing (merge-window order) of ``images``."""
    processor = transformers.Qwen2VLImageProcessor(
        patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL, do_resize=False, do_rescale=False,
        do_normalize=False,
    )
    out = processor(images=images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def _qwen2() -> torch.nn.Module:
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    config = transformers.Qwen2VLVisionConfig(depth=3, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2,
                                              patch_size=PATCH, temporal_patch_size=TEMPORAL, spatial_merge_size=MERGE)
    return Qwen2VisionTransformerPretrainedModel(config).eval()


def _qwen25() -> torch.nn.Module:
    # Attention windows of 16 px = 2x2 merge windows: the 4x6 image is split into 2 windows, reordered.
    config = transformers.Qwen2_5_VLVisionConfig(depth=3, hidden_size=32, intermediate_size=64, num_heads=2,
                                                 out_hidden_size=32, patch_size=PATCH, temporal_patch_size=TEMPORAL,
                                                 window_size=16, fullatt_block_indexes=[1], spatial_merge_size=MERGE)
    return transformers.Qwen2_5_VisionTransformerPretrainedModel(config).eval()


def _qwen3() -> torch.nn.Module:
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    config = transformers.Qwen3VLVisionConfig(depth=3, hidden_size=32, intermediate_size=64, num_heads=2,
                                              out_hidden_size=32, patch_size=PATCH, temporal_patch_size=TEMPORAL,
                                              spatial_merge_size=MERGE, num_position_embeddings=16,
                                              deepstack_visual_indexes=[0])
    return Qwen3VLVisionModel(config).eval()


def _glm4v() -> torch.nn.Module:
    from transformers.models.glm4v.modeling_glm4v import Glm4vVisionModel

    config = transformers.Glm4vVisionConfig(depth=3, hidden_size=32, intermediate_size=64, num_heads=2,
                                            out_hidden_size=32, patch_size=PATCH, temporal_patch_size=TEMPORAL,
                                            spatial_merge_size=MERGE, image_size=16)
    return Glm4vVisionModel(config).eval()


QWEN_TOWERS = {"qwen2-vl": _qwen2, "qwen2.5-vl": _qwen25, "qwen3-vl": _qwen3, "glm4v": _glm4v}


def _merge_window_to_raster(tokens: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
    """Per image, (1, C, h, w) maps from tokens in the processor's merge-window order."""
    out, start = [], 0
    for t, h, w in grid_thw.tolist():
        n = t * h * w
        out.append(rearrange(tokens[start:start + n], "(t hb wb mh mw) c -> t c (hb mh) (wb mw)",
                             t=t, hb=h // MERGE, wb=w // MERGE, mh=MERGE, mw=MERGE))
        start += n
    return out


def _tower_own_order(model: torch.nn.Module, states: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """Undo Qwen2.5-VL's attention-window reordering with the tower's own window index (as its merger does)."""
    if not hasattr(model, "fullatt_block_indexes"):
        return states
    module = sys.modules[type(model).__module__]
    window_index, _ = module.get_vision_window_index(grid_thw, spatial_merge_size=MERGE,
                                                     window_size=model.window_size, patch_size=PATCH)
    units = states.reshape(-1, MERGE * MERGE, states.shape[-1])
    return units[torch.argsort(window_index)].reshape(states.shape)


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("name", list(QWEN_TOWERS))
def test_qwen_style_towers_give_raster_maps_equal_to_their_hidden_states(name, count):
    torch.manual_seed(0)
    model = QWEN_TOWERS[name]()
    pixel_values, grid_thw = _qwen_inputs(_images(SIZES[:count] if count == 1 else SIZES))
    # GLM-4V's last hidden_states entry is its downsampled output, not block 3's; compare blocks 0..2.
    layers, indices = ([0, 1, 2], [0, 1, 2]) if name == "glm4v" else ([0, 1, -1], [0, 1, 3])
    with torch.no_grad():
        hidden = model(pixel_values, grid_thw=grid_thw, output_hidden_states=True).hidden_states
        with LayerTap(model, layers) as tap:
            features = tap(pixel_values, grid_thw=grid_thw)
            # The Hugging Face processor's keyword names work too.
            again = tap(pixel_values=pixel_values, image_grid_thw=grid_thw)
    assert tap.backbone.packed
    assert isinstance(features, LayerFeatures)
    assert features.grids == tuple((h, w) for _, h, w in grid_thw.tolist())
    assert features.grid is None
    assert features.offsets[-1] == pixel_values.shape[0]
    assert torch.equal(features.cu_seqlens(), torch.tensor(features.offsets, dtype=torch.int32))
    for got, k in zip(features.maps(), indices, strict=True):
        expected = _merge_window_to_raster(_tower_own_order(model, hidden[k], grid_thw), grid_thw)
        assert len(got) == count
        for g, e in zip(got, expected, strict=True):
            assert torch.equal(g, e), f"{name}: layer {k} differs"
    assert all(torch.equal(a, b) for a, b in zip(features, again, strict=True))


@pytest.mark.parametrize("name", ["qwen2-vl", "qwen2.5-vl"])
def test_first_hidden_state_puts_each_patch_at_its_pixel_position(name):
    """Independent of any permutation code: hidden state 0 at (y, x) is the patch embedding of pixels (y, x)."""
    torch.manual_seed(0)
    model = QWEN_TOWERS[name]()
    images = _images()
    pixel_values, grid_thw = _qwen_inputs(images)
    with torch.no_grad(), LayerTap(model, [0]) as tap:
        maps = tap(pixel_values, grid_thw=grid_thw).maps()[0]
        for image, got in zip(images, maps, strict=True):
            # (C, T, P, P) per raster patch, the frame repeated over T as the processor does for an image.
            patches = rearrange(image, "c (h p) (w q) -> (h w) c p q", p=PATCH, q=PATCH)
            patches = patches.unsqueeze(2).expand(-1, -1, TEMPORAL, -1, -1).reshape(patches.shape[0], -1)
            expected = rearrange(model.patch_embed(patches), "(h w) c -> 1 c h w", h=image.shape[1] // PATCH)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_per_image_views_and_one_image_runs():
    torch.manual_seed(0)
    model = _qwen25()
    images = _images()
    pixel_values, grid_thw = _qwen_inputs(images)
    with torch.no_grad(), LayerTap(model, [1, -1]) as tap:
        packed = tap(pixel_values, grid_thw=grid_thw)
        singles = [tap(*_qwen_inputs([image])[:1], grid_thw=_qwen_inputs([image])[1]) for image in images]
    per_image = packed.per_image()
    assert [f.grid for f in per_image] == [(4, 6), (2, 2), (6, 4)]
    for i, (view, single) in enumerate(zip(per_image, singles, strict=True)):
        for a, b, split in zip(view, single, packed.split(), strict=True):
            assert a.shape == (1, *split[i].shape)
            assert torch.equal(a[0], split[i])
            # Images attend only within themselves (cu_seqlens): a packed batch equals one call per image.
            torch.testing.assert_close(a[0], b, rtol=1e-5, atol=1e-5)


def test_pixtral_packs_images_of_different_sizes():
    torch.manual_seed(0)
    config = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                              num_attention_heads=2, patch_size=PATCH, image_size=32, head_dim=16)
    model = transformers.PixtralVisionModel(config).eval()
    images = torch.zeros(3, 3, 24, 24)
    for i, image in enumerate(_images()):
        images[i, :, : image.shape[1], : image.shape[2]] = image
    image_sizes = torch.tensor(SIZES)
    with torch.no_grad():
        hidden = model(images, image_sizes=image_sizes, output_hidden_states=True).hidden_states
        features = LayerTap(model, [0, 2, -1])(pixel_values=images, image_sizes=image_sizes)
    assert features.grids == ((4, 6), (2, 2), (6, 4))
    for got, k in zip(features, [0, 2, 3], strict=True):
        assert torch.equal(got, hidden[k][0])
    maps = features.maps()[1]
    start = 0
    for (h, w), m in zip(features.grids, maps, strict=True):
        expected = rearrange(hidden[2][0, start:start + h * w], "(h w) c -> 1 c h w", h=h)
        assert torch.equal(m, expected)
        start += h * w


def test_siglip2_naflex_drops_the_padding():
    torch.manual_seed(0)
    config = transformers.Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                              num_attention_heads=2, patch_size=PATCH, num_patches=16)
    model = transformers.Siglip2VisionModel(config).eval()
    grids = [(4, 6), (2, 2), (6, 4)]
    longest = max(h * w for h, w in grids)
    patches = torch.zeros(3, longest, 3 * PATCH * PATCH)
    mask = torch.zeros(3, longest, dtype=torch.long)
    for i, (image, (h, w)) in enumerate(zip(_images(), grids, strict=True)):
        patches[i, : h * w] = rearrange(image, "c (h p) (w q) -> (h w) (p q c)", p=PATCH, q=PATCH)
        mask[i, : h * w] = 1
    shapes = torch.tensor(grids)
    with torch.no_grad():
        hidden = model(patches, pixel_attention_mask=mask, spatial_shapes=shapes, output_hidden_states=True).hidden_states
        tap = LayerTap(model, [1, -1])
        features = tap(patches, pixel_attention_mask=mask, spatial_shapes=shapes)
    assert features.grids == tuple(grids)
    for got, k in zip(features.split(), [1, 3], strict=True):
        for i, (h, w) in enumerate(grids):
            assert torch.equal(got[i], hidden[k][i, : h * w])
    bad = mask.clone()
    bad[1, 0] = 0
    with pytest.raises(ValueError, match=r"Siglip2VisionModel expected pixel_attention_mask= \(B, max N\) marking"):
        tap(patches, pixel_attention_mask=bad, spatial_shapes=shapes)


def test_packed_input_errors():
    model = _qwen2()
    pixel_values, grid_thw = _qwen_inputs(_images())
    tap = LayerTap(model, [1])
    with pytest.raises(ValueError, match=r"expected grid_thw= a \(num_images, 3\) integer tensor, got NoneType"):
        tap(pixel_values)
    with pytest.raises(ValueError, match=r"expected flattened patches \(N, C_in \* T \* P \* P\) with N = sum of "
                                         r"t\*h\*w over grid_thw = 52, got shape \(51, 96\)"):
        tap(pixel_values[:51], grid_thw=grid_thw)
    with pytest.raises(TypeError, match=r"expected one of grid_thw= and image_grid_thw=, got both"):
        tap(pixel_values, grid_thw=grid_thw, image_grid_thw=grid_thw)
    with pytest.raises(ValueError, match=r"tokens='cls_patch' needs a CLS token"):
        LayerTap(model, [1], tokens="cls_patch")


def test_whole_qwen2_vl_model_is_tapped_on_its_visual_tower():
    vision = {"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2, "patch_size": PATCH,
              "temporal_patch_size": TEMPORAL, "spatial_merge_size": MERGE}
    text = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1,
            "num_key_value_heads": 2, "vocab_size": 64, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
    config = transformers.Qwen2VLConfig(vision_config=vision, text_config=text)
    model = transformers.Qwen2VLForConditionalGeneration(config).eval()
    pixel_values, grid_thw = _qwen_inputs(_images())
    with torch.no_grad(), LayerTap(model, [-1]) as tap:
        (got,) = tap(pixel_values=pixel_values, image_grid_thw=grid_thw)
        hidden = model.model.visual(pixel_values, grid_thw=grid_thw, output_hidden_states=True).hidden_states
    assert tap.backbone.blocks_path == "model.visual.blocks"
    expected = torch.cat([m.flatten(2)[0].T for m in _merge_window_to_raster(hidden[-1], grid_thw)])
    assert torch.equal(got, expected)


def _gemma4_inputs(grids, order=None):
    longest = max(h * w for h, w in grids)
    patches = torch.randn(len(grids), longest, 3 * PATCH * PATCH, generator=torch.Generator().manual_seed(0))
    positions = torch.full((len(grids), longest, 2), -1, dtype=torch.long)
    for b, (h, w) in enumerate(grids):
        y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        xy = torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1)
        positions[b, : h * w] = xy if order is None else xy[order(h * w)]
    return patches, positions


@pytest.mark.parametrize("shuffled", [False, True])
def test_gemma4_vision_places_tokens_by_their_position_ids(shuffled):
    torch.manual_seed(0)
    config = transformers.Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                             num_key_value_heads=2, num_hidden_layers=3, patch_size=PATCH,
                                             head_dim=16, position_embedding_size=64, pooling_kernel_size=2)
    model = transformers.Gemma4VisionModel(config).eval()
    grids = [(4, 6), (2, 2), (6, 4)]
    order = (lambda n: torch.randperm(n, generator=torch.Generator().manual_seed(n))) if shuffled else None
    patches, positions = _gemma4_inputs(grids, order)
    with torch.no_grad():
        hidden = model(patches, pixel_position_ids=positions, output_hidden_states=True).hidden_states
        features = LayerTap(model, [0, 1, 2])(patches, pixel_position_ids=positions)
    assert features.grids == tuple(grids)
    # Its last hidden_states entry is the pooler's output, not block 3's: compare blocks 0..2.
    for maps, k in zip(features.maps(), [0, 1, 2], strict=True):
        for b, ((h, w), got) in enumerate(zip(grids, maps, strict=True)):
            expected = torch.empty(1, 32, h, w)
            xy = positions[b, : h * w]
            expected[0, :, xy[:, 1], xy[:, 0]] = hidden[k][b, : h * w].T
            assert torch.equal(got, expected), f"layer {k} image {b}: {(got - expected).abs().max()}"
    bad = positions.clone()
    bad[0, 1] = bad[0, 0]  # one cell twice, another never
    with pytest.raises(ValueError, match=r"Gemma4VisionModel image 0: its 24 valid patches do not cover the 4x6 grid"):
        LayerTap(model, [1])(patches, pixel_position_ids=bad)
