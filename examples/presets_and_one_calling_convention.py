"""Presets that say what to tap, and one calling convention for every fuser, on a small random tower.

A timm ViT with 12 blocks (ViT-B's depth, random weights, nothing downloaded) stands in for the vision
tower. A preset is made for its depth, read from the tower itself; the module it builds says which
hidden states and tokens to tap. A depth at which a preset degenerates is refused by name. Then four
fuser families run in the same calling code: `fuser(features, grid=..., text=...)`.
Needs ``layerfuse[timm]``.

    python examples/presets_and_one_calling_convention.py
"""

from __future__ import annotations

import timm
import torch

from layerfuse import (
    ConcatFuser,
    CrossAttentionFuser,
    FusionProjector,
    LayerFeatures,
    LayerTap,
    MMFuser,
    TokenConcatFuser,
)
from layerfuse.presets import preset_layers


def main() -> None:
    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=64, embed_dim=64, num_heads=4,
                            num_classes=0).eval()
    images = torch.randn(2, 3, 64, 64)

    # 1. A preset made for the tower's depth (12), not a silent CLIP-L default of 24.
    module = FusionProjector.from_preset("lin_ed_3_18_23", dim=64, llm_dim=96, tower=vit)
    print("lin_ed_3_18_23 on a 12-block tower taps", module.layers, "with tokens", repr(module.tokens))
    with LayerTap(vit, module.layers, tokens=module.tokens) as tap, torch.no_grad():
        features = tap(images)
        print("visual tokens:", tuple(module(features).shape), "from grid", features.grid)

    # 2. A depth at which the preset would collapse is refused, naming the preset and the depth.
    try:
        preset_layers("lin_ed_18", depth=4)
    except ValueError as err:
        print("refused:", err, end="\n\n")

    # 3. One calling convention: the same call for every fuser; only IGVA-style fusers use `text`.
    fusers = {
        "Dense Connector SCI (preset)": ConcatFuser.from_preset("dense_connector_sci", dim=64, tower=vit),
        "Dense Connector STI (preset)": TokenConcatFuser.from_preset("dense_connector_sti", dim=64, tower=vit),
        "MMFuser": MMFuser(64, num_levels=2, heads=4),
        "cross-attention, 3x3 windows": CrossAttentionFuser(64, num_levels=2, heads=4, window=3),
    }
    orders = {name: fuser.layers or (4, 8, 11) for name, fuser in fusers.items()}  # query last for MMFuser
    wanted = sorted({k for order in orders.values() for k in order})
    with LayerTap(vit, wanted) as tap, torch.no_grad():
        by_layer = dict(zip(wanted, tap(images)))  # one forward for every fuser
    for name, fuser in fusers.items():
        order = orders[name]
        features = LayerFeatures([by_layer[k] for k in order], grid=tap.grid, layers=order)
        text = None  # the instruction embedding, for a fuser whose `uses_text` is True (IGVA)
        with torch.no_grad():
            out = fuser(features, grid=features.grid, text=text if fuser.uses_text else None)
        print(f"{name:<30} layers {order}: {tuple(out.shape)}")

    # An explicit grid that contradicts the tap's is an error, not silently preferred.
    with LayerTap(vit, module.layers) as tap, torch.no_grad():
        features = tap(images)
    try:
        module(features, grid=(2, 8))
    except ValueError as err:
        print("refused:", err)


if __name__ == "__main__":
    main()
