"""Layer-similarity heat-map and shallow/middle/deep bands of a ViT, offline.

Builds a random-weight timm ViT (no download), compares all 13 hidden states over a few images with
each metric, groups layers 1..12 into three bands and writes one heat-map per metric. Swap in trained
weights (``pretrained=True`` or ``load_state_dict``) and a DataLoader of natural images to get the
meaningful picture.

    python examples/layer_similarity.py --out-dir similarity_plots
"""

from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch

from layerfuse.analysis import METRICS, group_layers, layer_similarity, plot_similarity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224", help="timm model name (random weights)")
    parser.add_argument("--images", type=int, default=8, help="number of random images")
    parser.add_argument("--out-dir", type=Path, default=Path("similarity_plots"))
    args = parser.parse_args()

    torch.manual_seed(0)
    vit = timm.create_model(args.model, pretrained=False)
    images = torch.randn(args.images, 3, 224, 224)
    for metric in METRICS:
        result = layer_similarity(vit, images, metric=metric, batch_size=4, progress=False)
        groups = group_layers(result.subset(result.layers[1:]), k=3)  # the embedding output is not banded
        path = plot_similarity(result, args.out_dir / f"{metric}.png", groups=groups)
        bands = ", ".join(f"{name} {band[0]}-{band[-1]} (rep. {rep})"
                          for name, band, rep in zip(groups.names, groups.bands, groups.representatives))
        print(f"{metric:<14} {bands}  -> {path}")


if __name__ == "__main__":
    main()
