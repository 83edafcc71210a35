"""``layerfuse demo``: tap the layers LLaVA-1.5 and MMFuser read from a CLIP ViT-L/14-336-shaped tower.

Runs offline on the embedded random-weight :class:`~layerfuse.cli.demo_vit.DemoViT`. The demo is a
list of steps (``STEPS``); each reads and extends a shared :class:`DemoContext` and returns a
:class:`Table` to print, so later steps (fusers) consume the features the tap step left behind.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..features import LayerFeatures
from ..taps import LayerTap
from .demo_vit import DemoViT

__all__ = ["LAYER_SETS", "STEPS", "DemoContext", "DemoStep", "Table", "register", "run"]

# Hidden-state indices each method reads from CLIP ViT-L/14-336 (index 0 = embedding output).
LAYER_SETS: dict[str, tuple[int, ...]] = {
    "LLaVA-1.5": (-2,),
    "MMFuser": (-22, -17, -12, -7, -2),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DemoContext:
    """What the steps share: the options, the tower, the images and the features tapped so far."""

    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    model: nn.Module
    images: Tensor
    features: dict[str, LayerFeatures] = field(default_factory=dict)  # keyed like LAYER_SETS


@dataclass
class Table:
    """A titled table of strings with optional notes printed under it."""

    title: str
    header: tuple[str, ...]
    rows: list[tuple[str, ...]]
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        widths = [max(len(str(cell)) for cell in column) for column in zip(self.header, *self.rows)]
        lines = [self.title, "  ".join(h.ljust(w) for h, w in zip(self.header, widths)).rstrip()]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in self.rows]
        return "\n".join([*lines, *self.notes])


@dataclass(frozen=True)
class DemoStep:
    """One section of the demo: ``run(context)`` does the work and returns the table to print."""

    name: str
    run: Callable[[DemoContext], Table]


def tap_step(ctx: DemoContext) -> Table:
    """One tap of every layer any method reads; each method's features are then picked from it."""
    wanted = sorted({k for layers in LAYER_SETS.values() for k in layers})
    tap = LayerTap(ctx.model, wanted, tokens="patch")
    start = time.perf_counter()
    with torch.inference_mode(), tap:
        tapped = tap(ctx.images)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    elapsed_ms = (time.perf_counter() - start) * 1e3
    by_layer = dict(zip(wanted, tapped))
    for method, layers in LAYER_SETS.items():
        ctx.features[method] = LayerFeatures(
            [by_layer[k] for k in layers], grid=tapped.grid, layers=layers, num_prefix_tokens=tapped.num_prefix_tokens
        )
    rows = [
        (
            str(k),
            str(absolute),
            "x".join(map(str, by_layer[k].shape)),
            f"{tapped.grid[0]}x{tapped.grid[1]}" if tapped.grid else "?",
            ", ".join(m for m, layers in LAYER_SETS.items() if k in layers),
        )
        for k, absolute in zip(wanted, tap.resolved_layers)
    ]
    deepest = max(tap.resolved_layers)
    notes = [
        f"one forward, {elapsed_ms:.0f} ms; stopped after block {deepest} of {tap.backbone.depth} "
        f"(index 0 = embedding output, k = block k, -1 = last block)"
    ]
    header = ("layer", "absolute", "shape (B, N, C)", "grid", "used by")
    return Table("Layer taps (tokens='patch': CLS dropped)", header, rows, notes)


STEPS: list[DemoStep] = [DemoStep("taps", tap_step)]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="tap LLaVA's and MMFuser's layers from a random CLIP ViT-L/14-336-shaped tower",
        description=(
            "Build a random-weight CLIP ViT-L/14-336-shaped tower (24 blocks, width 1024, 336 px), tap the "
            "hidden states LLaVA-1.5 (-2) and MMFuser (-22, -17, -12, -7, -2) read, and print their shapes, "
            "patch grid and timing. Runs offline."
        ),
    )
    parser.add_argument("--small", action="store_true", help="a tiny 24-block tower (width 64, 64 px) instead")
    parser.add_argument("--batch", type=int, default=1, help="images per batch (default: 1)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="weights and images (default: float32)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for weights and images (default: 0)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.batch < 1:
        raise SystemExit(f"layerfuse demo: --batch expected a positive int, got {args.batch}")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise SystemExit(f"layerfuse demo: --device expected a torch device (cpu, cuda, cuda:1), got {args.device!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"layerfuse demo: --device {args.device}: no CUDA device is available")
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    build = DemoViT.small if args.small else DemoViT.clip_l14_336
    model = build(device=device, dtype=dtype).eval()
    built_s = time.perf_counter() - start
    images = torch.randn(args.batch, 3, model.image_size, model.image_size, device=device, dtype=dtype)
    ctx = DemoContext(args=args, device=device, dtype=dtype, model=model, images=images)
    shape = "tiny" if args.small else "CLIP ViT-L/14-336 shape"
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"DemoViT ({shape}): {model.depth} blocks, width {model.width}, {model.image_size} px, "
        f"patch {model.patch_size}; random weights, {params:.1f}M parameters, built in {built_s:.1f} s\n"
        f"input: {args.batch} x 3 x {model.image_size} x {model.image_size} on {device} ({args.dtype})\n"
    )
    for step in STEPS:
        print(step.run(ctx).render(), end="\n\n")
    return 0
