"""Tap the same hidden states out of timm, Hugging Face, open_clip and home-made ViTs, offline.

Every tower gets random weights and a small shape; each library's own hidden states are shown to
match the tap (index 0 = embedding output, k = block k, -2 = LLaVA's penultimate layer). Libraries
that are not installed are skipped. Nothing is downloaded.

    python examples/tap_any_vit.py
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from layerfuse import LayerTap
from layerfuse.cli.demo_vit import DemoBlock, DemoViT

LAYERS = [0, 3, -2]


def show(name: str, tap: LayerTap, images: torch.Tensor, reference: list[torch.Tensor] | None = None) -> None:
    with torch.no_grad():
        features = tap(images)
    shapes = ", ".join("x".join(map(str, f.shape)) for f in features)
    match = "" if reference is None else f"  equals the library's: {all(map(torch.equal, features, reference))}"
    print(f"{name:<34} layers {list(tap.resolved_layers)}  grid {features.grid}  [{shapes}]{match}")


def timm_vit() -> None:
    import timm

    vit = timm.create_model("vit_base_patch16_clip_224", pretrained=False, img_size=(32, 48), patch_size=8,
                            depth=6, embed_dim=64, num_heads=4).eval()
    images = torch.randn(2, 3, 32, 48)  # non-square: a 4 x 6 grid
    with torch.no_grad():
        # timm counts blocks from 0 and has no embedding-output entry; prefix tokens come back apart.
        blocks = vit.forward_intermediates(images, indices=[2, 4], norm=False, output_fmt="NLC",
                                           intermediates_only=True)
    with LayerTap(vit, LAYERS[1:]) as tap:
        show("timm vit_base_patch16_clip_224", tap, images, blocks)


def hf_clip() -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=6,
                              image_size=56, patch_size=14)
    vit = CLIPVisionModel(config).eval()
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        hidden = vit(images, output_hidden_states=True).hidden_states
    with LayerTap(vit, LAYERS, tokens="cls_patch") as tap:
        show("transformers CLIPVisionModel", tap, images, [hidden[k] for k in LAYERS])


def open_clip_vit() -> None:
    from open_clip.transformer import VisionTransformer

    vit = VisionTransformer(image_size=32, patch_size=8, width=64, layers=6, heads=4, mlp_ratio=2.0,
                            output_dim=32).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = vit.forward_intermediates(images, indices=[2, 4], intermediates_only=True, output_fmt="NLC")
    with LayerTap(vit, LAYERS[1:]) as tap:
        show("open_clip VisionTransformer", tap, images, out["image_intermediates"])


class HomeMadeViT(nn.Module):
    """No library knows this one: the tap is told where the blocks are and that there is no CLS."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, kernel_size=8, stride=8)
        self.trunk = nn.Sequential(*(DemoBlock(32, 2) for _ in range(6)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.stem(images).flatten(2).transpose(1, 2))


def main() -> None:
    torch.manual_seed(0)
    show("layerfuse DemoViT (CLIP layout)", LayerTap(DemoViT.small(), [-22, -2]), torch.randn(2, 3, 64, 64))
    show("home-made ViT, blocks='trunk'", LayerTap(HomeMadeViT(), LAYERS, blocks="trunk", num_prefix_tokens=0),
         torch.randn(2, 3, 24, 40))
    for library, run in (("timm", timm_vit), ("transformers", hf_clip), ("open_clip", open_clip_vit)):
        if importlib.util.find_spec(library) is None:
            print(f"{library} is not installed: skipped (pip install '.[all]' in the layerfuse checkout)")
        else:
            run()


if __name__ == "__main__":
    main()
