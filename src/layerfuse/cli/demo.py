"""``layerfuse demo``: every fuser family on a CLIP ViT-L/14-336-shaped tower, from taps to visual tokens.

Runs offline on the embedded random-weight `DemoViT`. The demo is a
list of steps (``STEPS``); each reads and extends a shared `DemoContext` and returns a
`Table` to print: the tap step runs the tower once for the layers of every method, the fuser
step feeds each method's fuser and LLaVA projector.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_device
from ..features import LayerFeatures
from ..fusers import (
    CrossAttentionFuser,
    Fuser,
    FusionProjector,
    InstructionGatedFuser,
    MMFuser,
    WeightedSumFuser,
)
from ..layers import Projector
from ..taps import LayerTap
from .demo_hf import hf_step
from .demo_vit import DemoViT
from .main import SUMMARIES
from .table import Table

__all__ = ["STEPS", "DemoContext", "DemoMethod", "DemoStep", "Table", "demo_methods", "register", "run"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class DemoMethod:
    """A published fusion (or LLaVA's single layer) as a fuser + LLaVA projector, ready to feed.

    ``text`` is the instruction embedding for a fuser that uses one (``module.uses_text``), else ``None``.
    """

    name: str
    module: FusionProjector
    text: Tensor | None = None


def demo_methods(width: int, depth: int, llm_dim: int, batch: int, *, device: torch.device,
                 dtype: torch.dtype) -> list[DemoMethod]:
    """One entry per fuser family, at the tower's width and LLM width ``llm_dim``."""
    dd: dict[str, Any] = {"device": device, "dtype": dtype}

    def preset(name: str) -> FusionProjector:
        return FusionProjector.from_preset(name, dim=width, llm_dim=llm_dim, depth=depth, **dd)

    def attach(fuser: Fuser, layers: tuple[int, ...], tokens: str = "patch") -> FusionProjector:
        return FusionProjector(fuser, Projector("mlp2x_gelu", fuser.out_dim, llm_dim, **dd), layers=layers,
                               tokens=tokens)

    mmfuser_layers = (-22, -17, -12, -7, -2)
    igva = InstructionGatedFuser(width, 768, gate_dim=min(width, 1024), **dd)
    # IGVA's instruction embedding comes from a sentence encoder outside the module; random unit rows here.
    text = torch.nn.functional.normalize(torch.randn(batch, 768, device=device, dtype=dtype), dim=-1)
    return [
        DemoMethod("LLaVA-1.5 (layer -2)", preset("llava")),
        DemoMethod("Lin et al. / look-shallower 3-18-23", preset("lin_ed_3_18_23")),
        DemoMethod("Dense Connector DCI", preset("dense_connector_dci")),
        DemoMethod("Dense Connector STI", preset("dense_connector_sti")),
        DemoMethod("Weighted sum (softmax)", attach(WeightedSumFuser(width, len(mmfuser_layers), **dd), mmfuser_layers)),
        DemoMethod("MMFuser", attach(MMFuser(width, heads=16 if width % 16 == 0 else 4, **dd), mmfuser_layers)),
        DemoMethod("Cross-attention, 3x3 windows",
                   attach(CrossAttentionFuser(width, heads=16 if width % 16 == 0 else 4, window=3, **dd),
                          mmfuser_layers)),
        DemoMethod("IGVA (instruction-gated)", attach(igva, igva.layers, igva.tokens), text),
    ]


@dataclass
class DemoContext:
    """What the steps share: the options, the tower, the images and the features tapped so far."""

    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    model: nn.Module
    images: Tensor
    methods: list[DemoMethod]
    features: dict[str, LayerFeatures] = field(default_factory=dict)  # keyed by method name


@dataclass(frozen=True)
class DemoStep:
    """One section of the demo: ``run(context)`` does the work and returns the table to print."""

    name: str
    run: Callable[[DemoContext], Table]


def _compact(layers: tuple[int, ...]) -> str:
    """``(0, 1, 2, 3, 7)`` -> ``"0..3, 7"``: long contiguous runs written as ranges."""
    parts: list[str] = []
    run: list[int] = []
    for k in (*layers, None):
        if run and k is not None and k == run[-1] + 1:
            run.append(k)
            continue
        if run:
            parts.append(f"{run[0]}..{run[-1]}" if len(run) > 2 else ", ".join(map(str, run)))
        run = [] if k is None else [k]
    return ", ".join(parts)


def tap_step(ctx: DemoContext) -> Table:
    """One tap of every layer any method reads (CLS kept); each method's features are picked from it."""
    wanted = sorted({k for m in ctx.methods for k in m.module.layers})
    tap = LayerTap(ctx.model, wanted, tokens="cls_patch")
    start = time.perf_counter()
    with torch.inference_mode(), tap:
        tapped = tap(ctx.images)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    elapsed_ms = (time.perf_counter() - start) * 1e3
    by_layer = dict(zip(wanted, tapped))
    rows = []
    for method in ctx.methods:
        layers, tokens = method.module.layers, method.module.tokens
        drop = 1 if tokens == "patch" else 0
        feats = LayerFeatures([by_layer[k][:, drop:] for k in layers], grid=tapped.grid, layers=layers,
                              num_prefix_tokens=1 - drop)
        ctx.features[method.name] = feats
        rows.append((method.name, _compact(layers), str(len(layers)), tokens, "x".join(map(str, feats[0].shape))))
    notes = [
        f"one forward for all methods, {elapsed_ms:.0f} ms; patch grid {tapped.grid[0]}x{tapped.grid[1]}; stopped "
        f"after block {max(tap.resolved_layers)} of {tap.backbone.depth} (index 0 = embedding output, "
        "k = block k, -1 = last block)"
    ]
    header = ("method", "hidden states", "n", "tokens", "each (B, N, C)")
    return Table("Layer taps", header, rows, notes)


def fuse_step(ctx: DemoContext) -> Table:
    """Run every method's fuser and projector on its tapped features."""
    rows = []
    for method in ctx.methods:
        module, feats = method.module, ctx.features[method.name]
        start = time.perf_counter()
        with torch.inference_mode():
            # one calling convention: every fuser takes the tap's grid (and the instruction, when it uses one)
            fused = module.fuser(feats, grid=feats.grid, text=method.text)
            tokens = module.projector(fused)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        elapsed_ms = (time.perf_counter() - start) * 1e3
        params = sum(p.numel() for p in module.fuser.parameters())
        rows.append((method.name, type(module.fuser).__name__, "x".join(map(str, fused.shape)),
                     "x".join(map(str, tokens.shape)), f"{params:,}", f"{elapsed_ms:.0f}"))
    header = ("method", "fuser", "fused (B, N, C)", "visual tokens", "fuser params", "ms")
    notes = ["random weights: shapes and timings, not quality. MMFuser and the cross-attention fuser start as the "
             "identity on the query layer (zero layer-scale), so they begin where LLaVA-1.5 does."]
    return Table(f"Fusers + LLaVA projector (mlp2x_gelu to {ctx.args.llm_dim})", header, rows, notes)


STEPS: list[DemoStep] = [DemoStep("taps", tap_step), DemoStep("fusers", fuse_step), DemoStep("hf", hf_step)]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help=SUMMARIES["demo"],
        description=(
            "Build a random-weight CLIP ViT-L/14-336-shaped tower (24 blocks, width 1024, 336 px), tap in one "
            "forward the hidden states that LLaVA-1.5, Lin et al., Dense Connector, a weighted sum, MMFuser, "
            "the cross-attention fuser and IGVA read, then run each fuser and LLaVA projector and print "
            "shapes, parameters and timings. Runs offline."
        ),
    )
    parser.add_argument("--small", action="store_true", help="a tiny 24-block tower (width 64, 64 px) instead")
    parser.add_argument("--batch", type=int, default=1, help="images per batch (default: 1)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="weights and images (default: float32)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for weights and images (default: 0)")
    parser.add_argument("--llm-dim", type=int, default=None,
                        help="LLM hidden size of the projectors (default: 4096, LLaVA-1.5-7B; 128 with --small)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.batch < 1:
        raise SystemExit(f"layerfuse demo: --batch expected a positive int, got {args.batch}")
    if args.llm_dim is None:
        args.llm_dim = 128 if args.small else 4096
    if args.llm_dim < 1:
        raise SystemExit(f"layerfuse demo: --llm-dim expected a positive int, got {args.llm_dim}")
    try:
        device = check_device("layerfuse demo", "--device", args.device)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    build = DemoViT.small if args.small else DemoViT.clip_l14_336
    model = build(device=device, dtype=dtype).eval()
    built_s = time.perf_counter() - start
    images = torch.randn(args.batch, 3, model.image_size, model.image_size, device=device, dtype=dtype)
    methods = demo_methods(model.width, model.depth, args.llm_dim, args.batch, device=device, dtype=dtype)
    ctx = DemoContext(args=args, device=device, dtype=dtype, model=model, images=images, methods=methods)
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
