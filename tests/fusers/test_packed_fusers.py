"""Fusers on a packed batch (images of different sizes in one sequence) equal one call per image."""

from __future__ import annotations

import pytest
import torch

from layerfuse import LayerFeatures
from layerfuse.fusers import (
    ConcatFuser,
    CrossAttentionFuser,
    InstructionGatedFuser,
    MMFuser,
    TokenConcatFuser,
    WeightedSumFuser,
)

C = 16
# Two images share a grid, two have grids of their own.
GRIDS = [(4, 6), (2, 4), (4, 6), (6, 4)]


def _packed(num_layers: int, grids=GRIDS) -> LayerFeatures:
    g = torch.Generator().manual_seed(0)
    total = sum(h * w for h, w in grids)
    layers = [torch.randn(total, C, generator=g, dtype=torch.float64) for _ in range(num_layers)]
    return LayerFeatures(layers, grids=grids, layers=range(num_layers))


def _spatial_fusers():
    torch.manual_seed(0)
    return {
        "mmfuser": MMFuser(C, num_levels=2, heads=2, points=2, layer_scale_init=0.5, dtype=torch.float64),
        "cross-attention-windows": CrossAttentionFuser(C, num_levels=2, heads=2, window=2, self_attn=True,
                                                       layer_scale_init=0.5, dtype=torch.float64),
        "token-concat-2d": TokenConcatFuser(C, 3, pool="2d", window=(2, 2), dtype=torch.float64),
        "token-concat-1d": TokenConcatFuser(C, 3, pool="1d", window=4, dtype=torch.float64),
        "concat": ConcatFuser([C] * 3, norm=True, dtype=torch.float64),
        "weighted-sum": WeightedSumFuser(C, 3, layer_proj=True, dtype=torch.float64),
    }


@pytest.mark.parametrize("name", list(_spatial_fusers()))
def test_packed_batch_equals_one_call_per_image(name):
    fuser = _spatial_fusers()[name].eval()
    features = _packed(3)
    with torch.no_grad():
        packed = fuser(features)
        singles = [fuser(image) for image in features.per_image()]
    expected = torch.cat([s[0] for s in singles], dim=0)
    assert packed.shape == expected.shape
    torch.testing.assert_close(packed, expected, rtol=1e-12, atol=1e-12)
    if name in ("mmfuser", "cross-attention-windows"):  # the fusion did something: not the query itself
        assert not torch.allclose(packed, features[-1])


def test_packed_gradients_equal_per_image_gradients():
    fuser = _spatial_fusers()["mmfuser"]
    features = _packed(3)
    leaves = [f.clone().requires_grad_() for f in features]
    packed = fuser(LayerFeatures(leaves, grids=features.grids))
    packed.square().sum().backward()
    grads = [leaf.grad.clone() for leaf in leaves]
    for leaf in leaves:
        leaf.grad = None
    per_image = LayerFeatures(leaves, grids=features.grids).per_image()
    torch.cat([fuser(image)[0] for image in per_image]).square().sum().backward()
    for a, leaf in zip(grads, leaves, strict=True):
        torch.testing.assert_close(a, leaf.grad, rtol=1e-10, atol=1e-12)


def test_packed_batch_refuses_an_explicit_grid():
    fuser = _spatial_fusers()["mmfuser"]
    with pytest.raises(ValueError, match=r"MMFuser.forward: grid=\(4, 6\) was passed with a packed batch, whose "
                                         r"per-image grids \[\(4, 6\), \(2, 4\), \(4, 6\), \(6, 4\)\] come with"):
        fuser(_packed(3), grid=(4, 6))


def test_packed_layer_features_checks():
    with pytest.raises(ValueError, match=r"LayerFeatures: layer 0 of a packed batch expected shape \(10, C\) for "
                                         r"grids \[\(2, 2\), \(2, 3\)\], got \(9, 8\)"):
        LayerFeatures([torch.randn(9, 8)], grids=[(2, 2), (2, 3)])
    with pytest.raises(ValueError, match=r"a packed batch \(grids=\) has per-image grids and no prefix tokens"):
        LayerFeatures([torch.randn(4, 8)], grids=[(2, 2)], grid=(2, 2))
    with pytest.raises(ValueError, match=r"LayerFeatures.offsets: only a packed batch"):
        LayerFeatures([torch.randn(1, 4, 8)], grid=(2, 2)).offsets


@pytest.mark.parametrize("name", list(_spatial_fusers()))
def test_packed_batch_of_no_images_is_empty(name):
    fuser = _spatial_fusers()[name]
    empty = LayerFeatures([torch.zeros(0, C, dtype=torch.float64)] * 3, grids=[])
    out = fuser(empty)
    assert out.shape == (0, fuser.out_dim)


# Batches of one and of three images of different sizes, fused in one call, against one call per image.
BATCHES = {"one-image": [(4, 6)], "three-images": [(4, 6), (3, 5), (6, 3)]}


def _one_call_fusers():
    torch.manual_seed(1)
    mmfuser = MMFuser(C, num_levels=2, heads=2, points=3, layer_scale_init=0.5, dtype=torch.float64)
    # Offsets large enough that samples cross the image borders into the padding, and off the pixel
    # centres: at a centre bilinear sampling has no derivative, and the two paths' positions, equal up
    # to rounding, may pick different one-sided ones (the outputs agree there too).
    with torch.no_grad():
        for attn in (mmfuser.cross_attn, mmfuser.self_attn):
            attn.sampling_offsets.weight.normal_(std=0.5)
            attn.sampling_offsets.bias.normal_(std=2.0)
    return {
        "mmfuser": mmfuser,
        "cross-attention-full": CrossAttentionFuser(C, num_levels=2, heads=2, self_attn=True, mlp_ratio=1.0,
                                                    layer_scale_init=0.5, dtype=torch.float64),
        "cross-attention-windows": CrossAttentionFuser(C, num_levels=2, heads=2, window=3, self_attn=True,
                                                       layer_scale_init=0.5, dtype=torch.float64),
        "token-concat-2d": TokenConcatFuser(C, 3, pool="2d", window=(2, 2), dtype=torch.float64),
        "token-concat-2d-uneven": TokenConcatFuser(C, 3, pool="2d", window=(2, 3), dtype=torch.float64),
        "token-concat-1d": TokenConcatFuser(C, 3, pool="1d", window=4, dtype=torch.float64),
        "igva": InstructionGatedFuser(C, 5, groups=[[0], [1]], base_layer=2, gate_dim=8, num_blocks=1,
                                      num_heads=2, has_cls=False, dtype=torch.float64),
    }


def _text(name, num_images):
    if name != "igva":
        return {}
    return {"text": torch.randn(num_images, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)}


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("name", list(_one_call_fusers()))
def test_one_call_equals_one_call_per_image_with_gradients(name, batch):
    fuser = _one_call_fusers()[name]
    grids = BATCHES[batch]
    features = _packed(3, grids)
    text = _text(name, len(grids))
    leaves = [f.clone().requires_grad_() for f in features]
    params = [p for p in fuser.parameters() if p.requires_grad]
    packed = fuser(LayerFeatures(leaves, grids=grids, layers=range(3)), **text)
    weight = torch.randn(packed.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = torch.autograd.grad((packed * weight).sum(), [*leaves, *params])

    images = LayerFeatures(leaves, grids=grids, layers=range(3)).per_image()
    singles = [fuser(image, **({"text": text["text"][i:i + 1]} if text else {}))[0] for i, image in enumerate(images)]
    expected = torch.cat(singles, dim=0)
    assert packed.shape == expected.shape
    torch.testing.assert_close(packed, expected, rtol=1e-12, atol=1e-12)
    expected_grads = torch.autograd.grad((expected * weight).sum(), [*leaves, *params], allow_unused=True)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want, rtol=1e-11, atol=1e-12)
    if name in ("mmfuser", "cross-attention-full", "cross-attention-windows"):  # the fusion did something
        assert not torch.allclose(packed, features[-1])


def test_mmfuser_samples_cross_into_the_padding():
    # The equality above is only a test of the padding if some samples land outside their image.
    fuser = _one_call_fusers()["mmfuser"]
    offsets = fuser.cross_attn.sampling_offsets(torch.randn(100, C, dtype=torch.float64))
    assert offsets.abs().max() > 6  # pixels: beyond the sides of every image of the batch


def _count(monkeypatch, module, name, calls=None):
    calls = [] if calls is None else calls
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_packed_mmfuser_samples_in_one_call(monkeypatch):
    import layerfuse.layers.deformable_attention as msda_layer

    calls = _count(monkeypatch, msda_layer, "ms_deform_attn")
    fuser = _one_call_fusers()["mmfuser"]
    fuser(_packed(3, BATCHES["three-images"]))
    assert calls == ["ms_deform_attn"] * 2  # the cross- and the self-attention, for all three images


@pytest.mark.parametrize("window", [None, 3])
def test_packed_cross_attention_attends_in_one_call(monkeypatch, window):
    import layerfuse.ops.attention.api as api
    import layerfuse.ops.attention.window as windowed

    calls = _count(monkeypatch, api, "apply_backend")
    _count(monkeypatch, windowed, "apply_backend", calls)
    fuser = CrossAttentionFuser(C, num_levels=2, heads=2, window=window, self_attn=True, dtype=torch.float64)
    fuser(_packed(3, BATCHES["three-images"]))
    assert len(calls) == 2  # the cross- and the self-attention, for all three images


def test_packed_igva_gates_in_one_call():
    fuser = _one_call_fusers()["igva"]
    calls = []
    fuser.gate.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    fuser(_packed(3, BATCHES["three-images"]), text=torch.zeros(3, 5, dtype=torch.float64))
    assert calls == [torch.Size([3, 2])]


def test_packed_igva_refuses_a_text_count_that_is_not_the_image_count():
    fuser = _one_call_fusers()["igva"]
    with pytest.raises(ValueError, match=r"InstructionGatedFuser.forward: text expected shape \(n_images, 5\) with "
                                         r"n_images=3, one instruction embedding per image of the packed batch "
                                         r"\(grids \[\(4, 6\), \(3, 5\), \(6, 3\)\]\), got \(1, 5\)"):
        fuser(_packed(3, BATCHES["three-images"]), text=torch.zeros(1, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="text is required"):
        fuser(_packed(3, BATCHES["three-images"]))


def test_packed_igva_refuses_a_cls_fuser():
    fuser = InstructionGatedFuser(C, 5, groups=[[0], [1]], base_layer=2, gate_dim=8, num_blocks=1, num_heads=2,
                                  has_cls=True, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"has_cls=True reads a CLS token per image, but a packed batch"):
        fuser(_packed(3, BATCHES["three-images"]), text=torch.zeros(3, 5, dtype=torch.float64))


def test_packed_image_smaller_than_the_window_is_refused():
    features = _packed(3, [(4, 6), (2, 2)])
    with pytest.raises(ValueError, match=r"window=3 does not fit level 0 with grid \(2, 2\)"):
        CrossAttentionFuser(C, num_levels=2, heads=2, window=3, dtype=torch.float64)(features)
    with pytest.raises(ValueError, match=r"grid \(2, 2\) \(an image of the packed batch\) is smaller than the pooling"):
        TokenConcatFuser(C, 3, pool="2d", window=(3, 3), dtype=torch.float64)(features)
