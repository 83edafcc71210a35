"""Time and peak memory of taking five hidden states out of a CLIP ViT-L/14-336-shaped tower.

Compares, for timm ``vit_large_patch14_clip_336`` and transformers ``CLIPVisionModel`` (random
weights, inference, batch 2): the plain forward; the plain forward truncated after the deepest
tapped block (the floor any early-stopping tap can reach); ``LayerTap`` of MMFuser's layers
[3, 8, 13, 18, -2]; transformers ``output_hidden_states=True`` then selecting; timm
``forward_intermediates(stop_early=True)``.

Packed row: a Qwen2.5-VL-shaped vision tower (32 blocks of width 1280, windowed and full-attention
blocks, patch 14, 2x2 merge) on 3 images of different sizes packed into one sequence: ``LayerTap``
of layers [8, 16, 24, -2] (per-image raster-order features) against the tower's own forward with
``output_hidden_states=True`` then selecting those layers (still in window order).

    python benchmarks/taps.py --repeats 3     # CPU, plus CUDA when present
    python benchmarks/taps.py --only packed   # the packed row only
    python benchmarks/taps.py --quick         # tiny towers: checks every case runs
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from harness import base_parser, devices_from, measure, print_table, write_json
from layerfuse import LayerTap

LAYERS = (3, 8, 13, 18, -2)  # hidden-state indices (0 = embedding output); MMFuser's set on 24 blocks


def timm_tower(quick: bool, device: torch.device, dtype: torch.dtype) -> nn.Module:
    import timm

    small = {"img_size": 56, "embed_dim": 64, "num_heads": 2} if quick else {}
    return timm.create_model("vit_large_patch14_clip_336", pretrained=False, num_classes=0, **small).to(device, dtype).eval()


def hf_tower(quick: bool, device: torch.device, dtype: torch.dtype) -> nn.Module:
    import transformers

    size = {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 2, "image_size": 56} if quick else {
        "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "image_size": 336}
    config = transformers.CLIPVisionConfig(num_hidden_layers=24, patch_size=14, **size)
    return transformers.CLIPVisionModel(config).to(device, dtype).eval()


@contextmanager
def truncated(blocks_owner: nn.Module, name: str, keep: int) -> Iterator[None]:
    """Temporarily keep only the first ``keep`` blocks (sharing their weights)."""
    blocks = getattr(blocks_owner, name)
    setattr(blocks_owner, name, blocks[:keep])
    try:
        yield
    finally:
        setattr(blocks_owner, name, blocks)


def cases(library: str, model: nn.Module, images: torch.Tensor) -> dict[str, Callable[[], Any]]:
    depth = 24
    absolute = [k % (depth + 1) for k in LAYERS]
    deepest = max(absolute)
    tap = LayerTap(model, LAYERS, tokens="all")
    if library == "timm":
        owner, name = model, "blocks"

        def plain() -> Any:
            return model.forward_features(images)

        def library_way() -> Any:
            return model.forward_intermediates(images, indices=[k - 1 for k in absolute], stop_early=True,
                                               norm=False, output_fmt="NLC", intermediates_only=True)

        library_case = "timm forward_intermediates(stop_early)"
    else:
        owner, name = model.encoder, "layers"

        def plain() -> Any:
            return model(images).last_hidden_state

        def library_way() -> Any:
            hidden = model(images, output_hidden_states=True).hidden_states
            return [hidden[k] for k in absolute]

        library_case = "hf output_hidden_states + select"

    def floor() -> Any:
        with truncated(owner, name, deepest):
            return plain()

    return {
        "plain forward": plain,
        f"forward truncated at block {deepest} (floor)": floor,
        "LayerTap": lambda: tap(images),
        library_case: library_way,
    }


PACKED_LAYERS = (8, 16, 24, -2)
PACKED_SIZES = ((224, 336), (336, 336), (448, 280))  # pixels; grids 16x24, 24x24, 32x20 patches of 14


def packed_cases(quick: bool, device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[], Any]]:
    import transformers

    size = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
            "fullatt_block_indexes": [7, 15, 23, 31]}
    if quick:
        size = {"depth": 32, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                "fullatt_block_indexes": [7, 15, 23, 31]}
    config = transformers.Qwen2_5_VLVisionConfig(patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
                                                 window_size=112, out_hidden_size=64, **size)
    model = transformers.Qwen2_5_VisionTransformerPretrainedModel(config).to(device, dtype).eval()
    grid_thw = torch.tensor([[1, h // 14, w // 14] for h, w in PACKED_SIZES], device=device)
    patches = torch.randn(int(grid_thw.prod(-1).sum()), 3 * 2 * 14 * 14, device=device, dtype=dtype)
    tap = LayerTap(model, PACKED_LAYERS)
    absolute = [k % 33 for k in PACKED_LAYERS]

    def library_way() -> Any:
        hidden = model(patches, grid_thw=grid_thw, output_hidden_states=True).hidden_states
        return [hidden[k] for k in absolute]

    return {
        "LayerTap (packed, raster order per image)": lambda: tap(patches, grid_thw=grid_thw),
        "hf output_hidden_states + select": library_way,
    }


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], default_json="taps.json")
    parser.add_argument("--batch", type=int, default=2, help="images per batch (default: 2)")
    parser.add_argument("--only", choices=["timm", "hf", "packed"], default=None, help="one tower only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats, warmup = (1, 1) if args.quick else (args.repeats, args.warmup)
    dtype = torch.float32
    results = []
    for device in devices_from(args.device):
        for library, build in (("timm", timm_tower), ("hf", hf_tower)):
            if args.only and args.only != library:
                continue
            torch.manual_seed(0)
            model = build(args.quick, device, dtype)
            size = 56 if args.quick else 336
            images = torch.randn(args.batch, 3, size, size, device=device, dtype=dtype)
            settings = {"model": library, "batch": args.batch, "layers": "3,8,13,18,-2"}
            with torch.inference_mode():
                for case, fn in cases(library, model, images).items():
                    results.append(measure(fn, case=case, device=device, dtype=dtype, mode="inference",
                                           warmup=warmup, repeats=repeats, settings=settings))
            del model
        if args.only in (None, "packed"):
            settings = {"model": "qwen2.5-vl vision", "images": len(PACKED_SIZES), "layers": "8,16,24,-2"}
            with torch.inference_mode():
                for case, fn in packed_cases(args.quick, device, dtype).items():
                    results.append(measure(fn, case=case, device=device, dtype=dtype, mode="inference",
                                           warmup=warmup, repeats=repeats, settings=settings))
    print_table(results, title="hidden-state extraction, ViT-L/14-336 shape, median over repeats; "
                "peak = extra memory of one call; ratios against the truncated forward",
                baseline=lambda r: ("hf output_hidden_states + select" if r.settings.get("images") else
                                    next((x.case for x in results if x.case.endswith("(floor)")), None)))
    write_json(results, args.json, benchmark="taps")


if __name__ == "__main__":
    main()
