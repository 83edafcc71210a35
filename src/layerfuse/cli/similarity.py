"""``layerfuse similarity``: layer-similarity heat-map and shallow/middle/deep bands of a backbone."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterable
from pathlib import Path

from .._checks import check_device
from ..analysis import (
    METRICS,
    ImageFolderBatches,
    LayerGroups,
    LayerSimilarity,
    SyntheticImages,
    find_images,
    group_layers,
    layer_similarity,
    plot_similarity,
)
from ..analysis.plot import SCALES
from ..taps import find_backbone
from .main import SUMMARIES
from .models import load_model

__all__ = ["register", "run"]

_WHERE = "layerfuse similarity"

_EPILOG = """\
examples:
  layerfuse similarity --model timm:vit_base_patch16_224 --synthetic 32 --out sim.png --json sim.json
  layerfuse similarity --model hf:./clip-vit-large-patch14-336 --images ./val_images --metric cka \\
      --layers=1,6,12,18,23,24 --out sim.png
  layerfuse similarity --from-json sim.json --k 4 --out sim4.png      (re-plot, no model is loaded)

Every image file under --images is decoded once before the model is built: unreadable files are
listed and skipped (--fail-on-unreadable stops instead), so a broken file never ends a run midway.
Bands are searched over every layer except the embedding output (hidden state 0), as in the LRS paper;
pass --include-embedding to band it too. Negative --layers need the '=' form: --layers=-2,-1.
The heat-map's default colour scale spans the 2nd-98th percentile of the off-diagonal similarities
(--scale full for a fixed scale up to 1, --scale minmax for the LRS paper's look).
"""

# Options that only mean something when the similarity is computed; --from-json rejects them.
_COMPUTE_OPTIONS = ("model", "checkpoint", "metric", "tokens", "batch_size", "image_size", "device", "seed",
                    "fail_on_unreadable")
_DEFAULTS = {"metric": "cosine", "tokens": "patch", "batch_size": 16, "device": "cpu", "seed": 0}


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``similarity`` subcommand to ``subparsers``; its handler is ``args.func(args)``."""
    parser = subparsers.add_parser(
        "similarity",
        help=SUMMARIES["similarity"],
        description=(
            "Compute the similarity between every pair of hidden states of a vision backbone over a set "
            "of images, split the layers into contiguous bands, print them and write a heat-map / JSON; "
            "or re-plot a saved JSON without the model."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", metavar="SPEC",
                        help="timm:<name> (random weights) or hf:<local folder> (its weights, else random); "
                             "required unless --from-json")
    parser.add_argument("--checkpoint", metavar="FILE", help=".safetensors / .bin state dict loaded into the model (strict)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="DIR", help="folder of image files (searched recursively)")
    source.add_argument("--synthetic", type=int, metavar="N", help="use N random images instead")
    source.add_argument("--from-json", metavar="FILE",
                        help="re-plot and re-band a result saved with --json, without loading a model")
    parser.add_argument("--fail-on-unreadable", action="store_true",
                        help="stop (before loading the model) if an image file cannot be read; "
                             "default: skip it with a warning")
    parser.add_argument("--metric", choices=tuple(METRICS), help="similarity metric (default: cosine)")
    parser.add_argument("--k", type=int, default=3, help="number of contiguous bands (default: 3)")
    parser.add_argument("--layers", default="all",
                        help="'all' (default) or comma-separated hidden-state indices (with --from-json: "
                             "a subset of the saved layers)")
    parser.add_argument("--tokens", choices=("patch", "cls_patch", "all"), help="tokens compared (default: patch)")
    parser.add_argument("--include-embedding", action="store_true", help="also band hidden state 0")
    parser.add_argument("--batch-size", type=int, help="images per forward pass (default: 16)")
    parser.add_argument("--image-size", type=int, help="input side in pixels (default: the model's)")
    parser.add_argument("--device", help="torch device to run on (default: cpu)")
    parser.add_argument("--seed", type=int, help="seed of the --synthetic images (default: 0)")
    parser.add_argument("--scale", choices=SCALES, default="robust",
                        help="heat-map colour scale: robust (default; off-diagonal 2nd-98th percentile), "
                             "full (min(0, min) to 1) or minmax (off-diagonal scaled to [0, 1])")
    parser.add_argument("--title", help="extra title line above the model, metric and image count")
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
    for flag, value in (("--k", args.k), ("--batch-size", args.batch_size), ("--synthetic", args.synthetic),
                        ("--image-size", args.image_size)):
        if value is not None and value <= 0:
            raise ValueError(f"{_WHERE}: {flag} expected a positive integer, got {value}")
    if args.from_json is not None:
        return _replot(args, layers)
    if args.model is None:
        raise ValueError(f"{_WHERE}: --model is required to compute a similarity (or re-plot with --from-json FILE)")
    options = {name: _DEFAULTS[name] if getattr(args, name) is None else getattr(args, name) for name in _DEFAULTS}
    device = check_device(_WHERE, "--device", options["device"])
    if layers != "all":
        _check_band_count(args.k, [k for k in layers if args.include_embedding or k != 0], "--layers")
    if args.out is None and args.json is None:
        print("note: neither --out nor --json given; only printing the bands")

    # Every image file is decoded here, before the model is built, so that a broken file costs
    # seconds and not a run.
    found = None
    if args.images is not None:
        found = find_images(args.images)
        if found.unreadable:
            listing = "\n".join(f"  {path}: {reason}" for path, reason in found.unreadable)
            count = f"{len(found.unreadable)} of {len(found.unreadable) + len(found.files)} image files"
            if args.fail_on_unreadable or not found.files:
                reason = "--fail-on-unreadable is set" if found.files else "no readable image is left"
                raise ValueError(f"{_WHERE}: {count} cannot be read ({reason}):\n{listing}")
            print(f"warning: skipping {count} that cannot be read:\n{listing}", file=sys.stderr)

    loaded = load_model(args.model, checkpoint=args.checkpoint, image_size=args.image_size)
    if layers == "all":
        depth = find_backbone(loaded.model).depth
        _check_band_count(args.k, range(0 if args.include_embedding else 1, depth + 1), f"{args.model}")
    loaded.model.to(device)
    if found is not None:
        images = ImageFolderBatches(found, image_size=loaded.image_size, mean=loaded.mean, std=loaded.std,
                                    batch_size=options["batch_size"], crop_pct=loaded.crop_pct)
        source = f"{len(images.files)} images from {args.images}"
        if found.unreadable:
            source += f" ({len(found.unreadable)} unreadable skipped)"
    else:
        images = SyntheticImages(args.synthetic, image_size=loaded.image_size, batch_size=options["batch_size"],
                                 seed=options["seed"])
        source = f"{args.synthetic} synthetic images"
    print(f"{args.model} ({loaded.weights} weights): {source} at {loaded.image_size}x{loaded.image_size}, "
          f"metric {options['metric']}, tokens {options['tokens']}")

    result = layer_similarity(loaded.model, images, metric=options["metric"], layers=layers, tokens=options["tokens"],
                              progress=False if args.no_progress else None)
    result = dataclasses.replace(result, model=args.model)
    skipped = [str(path) for path, _ in found.unreadable] if found is not None else []
    _report(args, result, weights=loaded.weights, source=source, skipped=skipped)
    return 0


def _replot(args: argparse.Namespace, layers: str | list[int]) -> int:
    given = [f"--{name.replace('_', '-')}" for name in _COMPUTE_OPTIONS if getattr(args, name) not in (None, False)]
    if given:
        raise ValueError(
            f"{_WHERE}: --from-json re-plots a saved result without a model; {', '.join(given)} only apply "
            f"when computing one"
        )
    result = LayerSimilarity.from_json(args.from_json)
    saved = json.loads(Path(args.from_json).read_text())
    if layers != "all":
        result = result.subset(layers)
    print(f"re-plotting {args.from_json} (no model loaded): {result.model or 'model not recorded'}, "
          f"{result.num_images} images, metric {result.metric}, layers {list(result.layers)}")
    _report(args, result, weights=saved.get("weights"), source=saved.get("images"),
            skipped=saved.get("skipped_files", []))
    return 0


def _report(args: argparse.Namespace, result: LayerSimilarity, *, weights: str | None, source: str | None,
            skipped: list[str]) -> None:
    """Band the layers, print the bands, write the heat-map and the JSON."""
    banded = result if args.include_embedding or 0 not in result.layers else result.subset(
        [k for k in result.layers if k != 0])
    _check_band_count(args.k, banded.layers, "the layers")
    groups = group_layers(banded, k=args.k)
    print(format_groups(groups))
    if args.out is not None:
        print(f"wrote {plot_similarity(result, args.out, groups=groups, title=args.title, scale=args.scale)}")
    if args.json is not None:
        payload = {
            **result.to_dict(),
            "weights": weights,
            "images": source,
            "skipped_files": skipped,
            "grouped_layers": list(banded.layers),
            "groups": groups.to_dict(),
        }
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")


def _check_band_count(k: int, layers: Iterable[int], what: str) -> None:
    layers = list(layers)
    if len(layers) < k:
        raise ValueError(
            f"{_WHERE}: --k {k} bands need at least {k} banded layers, but {what} give(s) {len(layers)}: "
            f"{layers} (hidden state 0 is banded only with --include-embedding)"
        )


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
