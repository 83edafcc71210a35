"""The demo tower: CLIP ViT-L/14-336 shape, reset_parameters, input checks."""

from __future__ import annotations

import pytest
import torch

from layerfuse.cli.demo_vit import DemoViT


def test_clip_l14_336_shape_on_the_meta_device():
    vit = DemoViT.clip_l14_336(device="meta")
    assert (vit.depth, vit.width, vit.image_size, vit.patch_size, vit.grid) == (24, 1024, 336, 14, (24, 24))
    assert vit.pos_embed.shape == (1, 577, 1024)
    assert sum(p.numel() for p in vit.parameters()) == 303_505_408


def test_forward_shape_and_dtype():
    vit = DemoViT.small(dtype=torch.float64)
    out = vit(torch.randn(2, 3, 64, 64, dtype=torch.float64))
    assert out.shape == (2, 17, 64)
    assert out.dtype == torch.float64
    assert torch.isfinite(out).all()


def test_reset_parameters_is_repeatable():
    vit = DemoViT.small()
    torch.manual_seed(3)
    vit.reset_parameters()
    first = [p.clone() for p in vit.parameters()]
    torch.manual_seed(3)
    vit.reset_parameters()
    assert all(torch.equal(a, b) for a, b in zip(first, vit.parameters(), strict=True))


def test_errors():
    with pytest.raises(ValueError, match=r"DemoViT: image_size expected a multiple of patch_size=16, got 40"):
        DemoViT(image_size=40, patch_size=16, width=8, depth=1, heads=2)
    with pytest.raises(ValueError, match=r"DemoBlock: width expected a multiple of heads=3, got 8"):
        DemoViT(image_size=32, patch_size=16, width=8, depth=1, heads=3)
    with pytest.raises(ValueError, match=r"DemoViT.forward: images expected shape \(B, C, 64, 64\), got \(1, 3, 32, 32\)"):
        DemoViT.small()(torch.randn(1, 3, 32, 32))
