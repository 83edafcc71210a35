"""Load a Dense Connector (DCI) ``mm_projector.bin`` and run the whole vision pipeline, offline.

A real checkpoint would come from the authors' release; here a state dict with the official key
names and shapes (``model.mm_projector.{0,2}.{weight,bias}``, saved in bf16 as their trainer does)
is written to a temporary file, and a small random CLIP vision tower with the real depth (24 blocks)
stands in for CLIP ViT-L/14-336.

    python examples/dense_connector_from_checkpoint.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from layerfuse import LayerTap, from_official

VIT_WIDTH, LLM_WIDTH = 64, 96  # CLIP-L/14 is 1024 wide and Vicuna-7B 4096; small here to run fast


def official_state_dict() -> dict[str, torch.Tensor]:
    """What a DCI stage-1 ``mm_projector.bin`` holds: mlp2x_gelu with input width 3 x ViT width."""
    shapes = {
        "model.mm_projector.0.weight": (LLM_WIDTH, 3 * VIT_WIDTH),
        "model.mm_projector.0.bias": (LLM_WIDTH,),
        "model.mm_projector.2.weight": (LLM_WIDTH, LLM_WIDTH),
        "model.mm_projector.2.bias": (LLM_WIDTH,),
    }
    return {key: (0.02 * torch.randn(shape)).to(torch.bfloat16) for key, shape in shapes.items()}


def main() -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mm_projector.bin"
        torch.save(official_state_dict(), path)
        module = from_official("dense_connector", path, variant="dci", tower="clip")
    print(module)
    print(f"taps hidden states {sorted(module.layers)} with tokens={module.tokens!r}")

    vision_tower = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=VIT_WIDTH, intermediate_size=4 * VIT_WIDTH, num_hidden_layers=24, num_attention_heads=4,
            image_size=112, patch_size=14,
        )
    ).eval()
    images = torch.randn(2, 3, 112, 112)

    with LayerTap(vision_tower, module.layers, tokens=module.tokens) as tap, torch.no_grad():
        features = tap(images)  # 24 x (2, 64, VIT_WIDTH), grid (8, 8)
        visual_tokens = module(features)
    print(f"features: {len(features)} layers of {tuple(features[0].shape)}, grid {features.grid}")
    print(f"visual tokens for the LLM: {tuple(visual_tokens.shape)}")  # (2, 64, LLM_WIDTH)

    # the same numbers straight from HF hidden_states, following the authors' encode_images
    with torch.no_grad():
        hidden = vision_tower(images, output_hidden_states=True).hidden_states
        patches = [h[:, 1:] for h in hidden]
        fused = torch.cat(
            [patches[23], torch.stack(patches[0:12]).mean(0), torch.stack(patches[12:24]).mean(0)], dim=-1
        )
        reference = module.projector(fused)
    print(f"max |difference| to the reference formula: {(visual_tokens - reference).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
