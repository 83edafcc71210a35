"""One contract for every backbone family: a tap of layer k equals the library's own hidden state k."""

from __future__ import annotations

import pytest
import torch

from layerfuse import LayerFeatures, LayerTap
from tap_families import FAMILIES, build, images_for

INDICES = (0, 1, 2, -2, -1)  # 0 = embedding output, 1 = first block, middle, penultimate, last


def _expected(full: torch.Tensor, tokens: str, num_prefix_tokens: int) -> torch.Tensor:
    if tokens == "patch":
        return full[:, num_prefix_tokens:]
    if tokens == "cls_patch":
        return torch.cat([full[:, :1], full[:, num_prefix_tokens:]], dim=1)
    return full


@pytest.mark.parametrize("tokens", ["patch", "cls_patch", "all"])
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_tap_equals_library_hidden_states(family, tokens):
    model = build(family)
    if tokens == "cls_patch" and not family.has_class_token:
        with pytest.raises(ValueError, match="tokens='cls_patch' needs a CLS token"):
            LayerTap(model, INDICES, tokens=tokens)
        return
    images = images_for(family)
    with torch.no_grad(), LayerTap(model, INDICES, tokens=tokens) as tap:
        features = tap(images)
        for i, k in enumerate(INDICES):
            full = family.reference(model, images, k if k >= 0 else family.depth + 1 + k)
            expected = _expected(full, tokens, family.num_prefix_tokens)
            assert torch.equal(features[i], expected), f"{family.name}: layer {k} differs"

    assert isinstance(features, LayerFeatures)
    assert features.layers == INDICES
    assert features.grid == family.grid == tap.grid
    assert tap.resolved_layers == tuple(k % (family.depth + 1) for k in INDICES)
    assert tap.num_hidden_states == family.depth + 1
    assert tap.backbone.num_prefix_tokens == family.num_prefix_tokens
    num_patches = family.grid[0] * family.grid[1]
    prefix = {"patch": 0, "cls_patch": 1, "all": family.num_prefix_tokens}[tokens]
    assert features.num_prefix_tokens == prefix
    assert all(f.shape[:2] == (2, prefix + num_patches) for f in features)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_early_stopped_tap_equals_full_forward_state(family):
    """Stopping after block 1 gives the same tensor as the library's full computation."""
    model = build(family)
    images = images_for(family, batch=1)
    with torch.no_grad():
        (tapped,) = LayerTap(model, [1], tokens="all")(images)
        assert torch.equal(tapped, family.reference(model, images, 1))


def _clip_24_blocks():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=24, image_size=28, patch_size=14
    )
    return transformers.CLIPVisionModel(config).eval()


def test_llava_and_mmfuser_layers_on_a_24_block_clip_tower():
    """LLaVA's -2 (CLS dropped) and MMFuser's [-22, -17, -12, -7, -2] are hidden_states[23] and [3, 8, 13, 18, 23]."""
    model = _clip_24_blocks()
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        hidden = model(images, output_hidden_states=True).hidden_states
        (llava,) = LayerTap(model, [-2], tokens="patch")(images)
        mmfuser_tap = LayerTap(model, [-22, -17, -12, -7, -2])
        mmfuser = mmfuser_tap(images)
    assert len(hidden) == 25
    assert torch.equal(llava, hidden[-2][:, 1:])
    assert mmfuser_tap.resolved_layers == (3, 8, 13, 18, 23)
    for got, k in zip(mmfuser, (3, 8, 13, 18, 23), strict=True):
        assert torch.equal(got, hidden[k][:, 1:])


def test_all_layers_and_repeats():
    family = next(f for f in FAMILIES if f.name == "hf-clip")
    model = build(family)
    images = images_for(family)
    with torch.no_grad():
        hidden = model(images, output_hidden_states=True).hidden_states
        every = LayerTap(model, "all", tokens="all")(images)
        repeated = LayerTap(model, [-1, 2, -1])(images)
    assert every.layers == tuple(range(family.depth + 1))
    assert all(torch.equal(a, b) for a, b in zip(every, hidden, strict=True))
    assert [torch.equal(r, hidden[k][:, 1:]) for r, k in zip(repeated, (4, 2, 4))] == [True] * 3
