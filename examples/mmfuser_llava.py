"""MMFuser end to end, offline, on random weights: tap a ViT, fuse with deformable attention, project.

A small CLIP vision tower (CLIP-L's layout scaled down: 24 blocks, CLS token, random weights) is
tapped at MMFuser's layers -22, -17, -12, -7, -2; the fuser starts as the identity on layer -2, a few
optimiser steps move it off, and the module is saved, reloaded and converted from the authors' key
layout. A timm ViT on a non-square image shows the grid travelling from the tap to the fuser.
Needs ``layerfuse[hf,timm]``; nothing is downloaded.

    python examples/mmfuser_llava.py
"""

from __future__ import annotations

import tempfile

import timm
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from layerfuse import FusionProjector, LayerTap, MMFuser, Projector, from_official

LAYERS = [-22, -17, -12, -7, -2]  # four value levels, shallow to deep, then the query


def authors_layout(module: FusionProjector) -> dict[str, torch.Tensor]:
    """The keys MMFuser's trainer writes to mm_projector.bin: fuser at 0.*, MLP Linears at 1.*, 3.*."""
    sd = {f"model.mm_projector.0.{k}": v for k, v in module.fuser.state_dict().items()}
    for k, v in module.projector.state_dict().items():
        index, rest = k.split(".", 1)
        sd[f"model.mm_projector.{int(index) + 1}.{rest}"] = v
    return sd


def main() -> None:
    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=24, num_attention_heads=4,
        image_size=112, patch_size=14,
    )).eval()
    module = FusionProjector(MMFuser(64, num_levels=4, heads=4, points=4), Projector("mlp2x_gelu", 64, 96),
                             layers=LAYERS, tokens="patch")
    print("fuser:", module.fuser.extra_repr())

    images = torch.randn(2, 3, 112, 112)
    with LayerTap(vision, module.layers, tokens=module.tokens) as tap, torch.no_grad():
        features = tap(images)  # 5 x (2, 64, 64): the CLS token is dropped, grid (8, 8) rides along
    print(f"{len(features)} layers {tuple(features[0].shape)}, grid {features.grid}")

    # Zero layer-scales: at initialisation the fuser returns the query layer (-2) bit for bit.
    fused = module.fuser(features)
    print("identity at init:", torch.equal(fused, features[-1]))

    optimiser = torch.optim.AdamW(module.parameters(), lr=1e-2)
    target = torch.randn(2, 64, 96)
    for step in range(3):
        loss = (module(features) - target).square().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        print(f"step {step}: loss {loss.item():.4f}, |gamma1| {module.fuser.gamma1.abs().mean().item():.4f}")
    print("identity after training:", torch.equal(module.fuser(features), features[-1]))

    with tempfile.TemporaryDirectory() as folder:
        module.save_pretrained(folder)
        reloaded = FusionProjector.from_pretrained(folder)
    converted = from_official("mmfuser", authors_layout(module), heads=4, points=4)
    with torch.no_grad():
        out = module(features)
        print("visual tokens:", tuple(out.shape),
              "| reloaded equal:", torch.equal(reloaded(features), out),
              "| converted from the authors' keys equal:", torch.equal(converted(features), out))

    # Non-square: a timm ViT with dynamic image size on a 112 x 176 image has a 7 x 11 grid.
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True).eval()
    fuser = MMFuser(vit.embed_dim, num_levels=2, heads=3, points=4)
    with LayerTap(vit, [3, 7, -2]) as tap, torch.no_grad():
        features = tap(torch.randn(1, 3, 112, 176))
        print(f"timm: grid {features.grid}, fused {tuple(fuser(features).shape)}")


if __name__ == "__main__":
    main()
