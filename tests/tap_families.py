"""Tiny random-weight vision transformers of every family LayerTap supports, with their own references.

Each family builds a model and a ``reference(model, images, k)`` giving hidden state k (0 = embedding
output, k = block k, all tokens) the way the backbone's library computes it: Hugging Face
``hidden_states[k]``, timm ``forward_intermediates`` at block k-1, open_clip's ``forward_intermediates``.
timm and open_clip have no index-0 intermediate, so index 0 is their own embedding code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], nn.Module]
    reference: Callable[[nn.Module, Tensor, int], Tensor]
    image_size: tuple[int, int]
    grid: tuple[int, int]
    num_prefix_tokens: int
    has_class_token: bool
    depth: int
    module: str  # library to import (skipped when absent)


def _cat(prefix: Tensor | None, patches: Tensor) -> Tensor:
    return patches if prefix is None else torch.cat([prefix, patches], dim=1)


# --- timm --------------------------------------------------------------------------------------

def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()

    return build


def _timm_reference(model: nn.Module, images: Tensor, k: int) -> Tensor:
    if k == 0:
        x = model.patch_embed(images)
        x = model._pos_embed(x)
        x = x[0] if isinstance(x, tuple) else x  # Eva returns (tokens, rope)
        return model.norm_pre(x)
    (out,) = model.forward_intermediates(
        images, indices=[k - 1], norm=False, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True
    )
    # timm pairs (patches, prefix) only when the model has prefix tokens.
    return _cat(out[1], out[0]) if isinstance(out, tuple) else out


_TINY = {"embed_dim": 32, "num_heads": 2}


# --- transformers ------------------------------------------------------------------------------

def _hf(model_cls: str, config_cls: str, **config) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        cfg = getattr(transformers, config_cls)(
            hidden_size=32, intermediate_size=64, num_attention_heads=2, **config
        )
        return getattr(transformers, model_cls)(cfg).eval()

    return build


def _hf_reference(model: nn.Module, images: Tensor, k: int) -> Tensor:
    return model(images, output_hidden_states=True).hidden_states[k]


# --- open_clip ---------------------------------------------------------------------------------

def _open_clip_build() -> nn.Module:
    from open_clip.transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, width=32, layers=4, heads=2, mlp_ratio=2.0, output_dim=16).eval()


def _open_clip_reference(model: nn.Module, images: Tensor, k: int) -> Tensor:
    if k == 0:
        return model._embeds(images)
    out = model.forward_intermediates(
        images, indices=[k - 1], intermediates_only=True, output_fmt="NLC", output_extra_tokens=True
    )
    return _cat(out["image_intermediates_prefix"][0], out["image_intermediates"][0])


# --- layerfuse's demo tower ----------------------------------------------------------------------

def _demo_build() -> nn.Module:
    from layerfuse.cli.demo_vit import DemoViT

    return DemoViT(image_size=32, patch_size=8, width=32, depth=4, heads=2).eval()


def _demo_reference(model: nn.Module, images: Tensor, k: int) -> Tensor:
    patches = model.patch_embed(images).flatten(2).transpose(1, 2)
    x = torch.cat([model.cls_token.expand(images.shape[0], -1, -1), patches], dim=1)
    x = model.norm_pre(x + model.pos_embed)
    for block in model.blocks[:k]:
        x = block(x)
    return x


FAMILIES = [
    Family("timm-clip-vit", _timm("vit_base_patch16_clip_224", img_size=32, patch_size=8, depth=4, **_TINY),
           _timm_reference, (32, 32), (4, 4), 1, True, 4, "timm"),
    Family("timm-siglip-vit", _timm("vit_base_patch16_siglip_224", img_size=32, patch_size=8, depth=4, **_TINY),
           _timm_reference, (32, 32), (4, 4), 0, False, 4, "timm"),
    Family("timm-dinov2-reg4", _timm("vit_small_patch14_reg4_dinov2", img_size=28, depth=4, **_TINY),
           _timm_reference, (28, 28), (2, 2), 5, True, 4, "timm"),
    Family("timm-deit-distilled", _timm("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=4, **_TINY),
           _timm_reference, (32, 32), (4, 4), 2, True, 4, "timm"),
    Family("timm-eva02", _timm("eva02_tiny_patch14_224", img_size=28, depth=4, **_TINY),
           _timm_reference, (28, 28), (2, 2), 1, True, 4, "timm"),
    Family("timm-dynamic-nonsquare",
           _timm("vit_base_patch16_224", img_size=32, patch_size=8, depth=4, dynamic_img_size=True, **_TINY),
           _timm_reference, (24, 40), (3, 5), 1, True, 4, "timm"),
    Family("hf-clip", _hf("CLIPVisionModel", "CLIPVisionConfig", num_hidden_layers=4, image_size=32, patch_size=8),
           _hf_reference, (32, 32), (4, 4), 1, True, 4, "transformers"),
    Family("hf-clip-projection",
           _hf("CLIPVisionModelWithProjection", "CLIPVisionConfig", num_hidden_layers=4, image_size=32, patch_size=8,
               projection_dim=16),
           _hf_reference, (32, 32), (4, 4), 1, True, 4, "transformers"),
    Family("hf-siglip", _hf("SiglipVisionModel", "SiglipVisionConfig", num_hidden_layers=4, image_size=32, patch_size=8),
           _hf_reference, (32, 32), (4, 4), 0, False, 4, "transformers"),
    Family("hf-dinov2", _hf("Dinov2Model", "Dinov2Config", num_hidden_layers=4, image_size=32, patch_size=8),
           _hf_reference, (32, 24), (4, 3), 1, True, 4, "transformers"),
    Family("hf-dinov2-registers",
           _hf("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", num_hidden_layers=4, image_size=32, patch_size=8,
               num_register_tokens=3),
           _hf_reference, (32, 32), (4, 4), 4, True, 4, "transformers"),
    Family("hf-vit", _hf("ViTModel", "ViTConfig", num_hidden_layers=4, image_size=32, patch_size=8),
           _hf_reference, (32, 32), (4, 4), 1, True, 4, "transformers"),
    Family("open-clip-vit", _open_clip_build, _open_clip_reference, (32, 32), (4, 4), 1, True, 4, "open_clip"),
    Family("layerfuse-demo-vit", _demo_build, _demo_reference, (32, 32), (4, 4), 1, True, 4, "layerfuse"),
]


@functools.cache
def _built(name: str) -> nn.Module:
    family = next(f for f in FAMILIES if f.name == name)
    pytest.importorskip(family.module)
    torch.manual_seed(0)
    return family.build()


def build(family: Family) -> nn.Module:
    """The family's model, built once per test session (models are only read by the tests)."""
    return _built(family.name)


def images_for(family: Family, batch: int = 2) -> Tensor:
    return torch.randn(batch, 3, *family.image_size, generator=torch.Generator().manual_seed(1))
