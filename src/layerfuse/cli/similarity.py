"""``layerfuse similarity``: layer-similarity heat-map and shallow/middle/deep bands of a backbone."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .._checks import check_device
from ..analysis import (
    METRICS,
    ImageFolderBatches,
    LayerGroups,
    LayerSimilarity,
    SyntheticImages,
    group_layers,
    layer_similarity,
    plot_similarity,
)
from .models import load_model

__all__ = ["register", "run"]

_WHERE = "layerfuse similarity"

_EPILOG = """\
examples:
  layerfuse similarity --model timm:vit_base_patch16_224 --synthetic 32 --out sim.png --json sim.json
  layerfuse similarity --model hf:./clip-vit-large-patch14-336 --images ./val_images --metric cka \\
      --layers=1,6,12,18,23,24 --out sim.png

Bands are searched over every layer except the embedding output (hidden state 0), as in the LRS paper;
pass --include-embedding to band it too. Negative --layers need the '=' form: --layers=-2,-1.
"""


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``similarity`` subcommand to ``subparsers``; its handler is ``args.func(args)``."""
    parser = subparsers.add_parser(
        "similarity",
        help="layer-by-layer representation similarity of a ViT, with band grouping and a heat-map",
        description=(
            "Compute the similarity between every pair of hidden states of a vision backbone over a set "
            "of images, split the layers into contiguous bands, print them and write a heat-map / JSON."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, metavar="SPEC",
                        help="timm:<name> (random weights) or hf:<local folder> (its weights, else random)")
    parser.add_argument("--checkpoint", metavar="FILE", help=".safetensors / .bin state dict loaded into the model (strict)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="DIR", help="folder of image files (searched recursively)")
    source.add_argument("--synthetic", type=int, metavar="N", help="use N random images instead")
    parser.add_argument("--metric", choices=tuple(METRICS), default="cosine", help="similarity metric (default: cosine)")
    parser.add_argument("--k", type=int, default=3, help="number of contiguous bands (default: 3)")
    parser.add_argument("--layers", default="all", help="'all' (default) or comma-separated hidden-state indices")
    parser.add_argument("--tokens", choices=("patch", "cls_patch", "all"), default="patch",
                        help="tokens compared (default: patch)")
    parser.add_argument("--include-embedding", action="store_true", help="also band hidden state 0")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: 16)")
    parser.add_argument("--image-size", type=int, help="input side in pixels (default: the model's)")
    parser.add_argument("--device", default="cpu", help="torch device to run on (default: cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --synthetic images (default: 0)")
    parser.add_argument("--normalize", action="store_true", help="min-max scale the heat-map's off-diagonal")
    parser.add_argument("--title", help="heat-map title")
    parser.add_argument("--out", metavar="PNG", help="write the heat-map here")
    parser.add_argument("--json", metavar="FILE", help="write the matrix and bands here as JSON")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Execute ``layerfuse similarity``; a bad flag, file or model exits with a one-line message."""
    try:
        return _run(args)
    except (ValueError, TypeError, OSError, ImportError) as err:
        raise SystemExit(f"{_WHERE}: error: {err}") from err


def _run(args: argparse.Namespace) -> int:
    layers = _parse_layers(args.layers)
    device = check_device(_WHERE, "--device", args.device)
    for flag, value in (("--k", args.k), ("--batch-size", args.batch_size), ("--synthetic", args.synthetic),
                        ("--image-size", args.image_size)):
        if value is not None and value <= 0:
            raise ValueError(f"{_WHERE}: {flag} expected a positive integer, got {value}")
    if args.out is None and args.json is None:
        print("note: neither --out nor --json given; only printing the bands")

    loaded = load_model(args.model, checkpoint=args.checkpoint, image_size=args.image_size)
    loaded.model.to(device)
    if args.images is not None:
        images = ImageFolderBatches(args.images, image_size=loaded.image_size, mean=loaded.mean, std=loaded.std,
                                    batch_size=args.batch_size, crop_pct=loaded.crop_pct)
        source = f"{len(images.files)} images from {args.images}"
    else:
        images = SyntheticImages(args.synthetic, image_size=loaded.image_size, batch_size=args.batch_size,
                                 seed=args.seed)
        source = f"{args.synthetic} synthetic images"
    print(f"{args.model} ({loaded.weights} weights): {source} at {loaded.image_size}x{loaded.image_size}, "
          f"metric {args.metric}, tokens {args.tokens}")

    result = layer_similarity(loaded.model, images, metric=args.metric, layers=layers, tokens=args.tokens,
                              progress=not args.no_progress)
    banded = result if args.include_embedding or 0 not in result.layers else result.subset(
        [k for k in result.layers if k != 0])
    groups = group_layers(banded, k=args.k)
    print(format_groups(groups))

    if args.out is not None:
        print(f"wrote {plot_similarity(result, args.out, groups=groups, title=args.title, normalize=args.normalize)}")
    if args.json is not None:
        _write_json(Path(args.json), args, loaded.weights, source, result, banded, groups)
        print(f"wrote {args.json}")
    return 0


def format_groups(groups: LayerGroups) -> str:
    """One line per band: name, layer range and representative, under a header with the score."""
    lines = [f"{len(groups.bands)} bands (score {groups.score:.4f} = within {groups.within:.4f} - "
             f"between {groups.between:.4f}):"]
    for name, band, rep in zip(groups.names, groups.bands, groups.representatives):
        span = f"{band[0]}-{band[-1]}" if len(band) > 1 else f"{band[0]}"
        lines.append(f"  {name:<8} layers {span:<8} representative {rep}")
    return "\n".join(lines)


def _parse_layers(text: str) -> str | list[int]:
    if text == "all":
        return text
    try:
        layers = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"{_WHERE}: --layers expected 'all' or comma-separated integers like 0,6,12, got {text!r}") from None
    return layers


def _write_json(path: Path, args: argparse.Namespace, weights: str, source: str, result: LayerSimilarity,
                banded: LayerSimilarity, groups: LayerGroups) -> None:
    payload = {
        "model": args.model,
        "weights": weights,
        "images": source,
        **result.to_dict(),
        "grouped_layers": list(banded.layers),
        "groups": groups.to_dict(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
