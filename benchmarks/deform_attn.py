"""Multi-scale deformable attention sampling: our PyTorch path and Triton kernel vs per-level grid_sample.

Rows, side by side in one run:

- ``grid_sample per level``: the straightforward formulation of the authors' pure-PyTorch reference
  (Deformable-DETR's ``ms_deform_attn_core_pytorch``): one ``grid_sample`` per level, ``stack``,
  multiply by the attention weights, sum; run in float32 as the authors' module casts it. The
  baseline of the ratio columns.
- ``layerfuse pytorch``: ``ms_deform_attn(..., backend="pytorch")``.
- ``layerfuse triton`` (CUDA only): ``ms_deform_attn(..., backend="triton")``.

Settings: ``llava`` is MMFuser at LLaVA-1.5 scale (4 levels of 24x24, 576 queries, 16 heads of 64,
4 points) at batch 2 on the CPU and 32 on CUDA; ``highres`` the same with 48x48 grids (2304 queries)
at batch 1 on the CPU and 8 on CUDA. "forward" runs under ``torch.no_grad()``; "forward+backward"
takes gradients of value, locations and weights.

Peak memory is measured by ``harness.measure``: the CUDA allocator's peak, or on the CPU the largest
total size of tensors alive at once during one call.

    python benchmarks/deform_attn.py --device cpu --repeats 3
    python benchmarks/deform_attn.py --device cuda --dtypes float32,bfloat16
    python benchmarks/deform_attn.py --quick
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from harness import Result, base_parser, devices_from, measure, print_table, write_json
from layerfuse.ops import ms_deform_attn

BASELINE = "grid_sample per level"
# name -> (grid side, queries per side, batch on CPU, batch on CUDA)
SETTINGS = {"llava": (24, 24, 2, 32), "highres": (48, 48, 1, 8)}
HEADS, HEAD_DIM, LEVELS, POINTS = 16, 64, 4, 4


def grid_sample_per_level(value: Tensor, shapes: list[tuple[int, int]], loc: Tensor, attn: Tensor) -> Tensor:
    """Deformable-DETR's ``ms_deform_attn_core_pytorch``, with the authors' float32 cast around it."""
    out_dtype = value.dtype
    value, loc, attn = value.float(), loc.float(), attn.float()
    b, _, m, d = value.shape
    _, nq, _, num_levels, num_points, _ = loc.shape
    value_list = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * loc - 1
    samples = []
    for lvl, (h, w) in enumerate(shapes):
        value_l = value_list[lvl].flatten(2).transpose(1, 2).reshape(b * m, d, h, w)
        grid_l = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        samples.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attn.transpose(1, 2).reshape(b * m, 1, nq, num_levels * num_points)
    out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1).view(b, m * d, nq)
    return out.transpose(1, 2).contiguous().to(out_dtype)


def make_inputs(setting: str, device: torch.device, dtype: torch.dtype, quick: bool) -> tuple:
    side, q_side, cpu_batch, cuda_batch = SETTINGS[setting]
    if quick:
        side, q_side, cpu_batch, cuda_batch = 6, 6, 1, 2
    batch = cuda_batch if device.type == "cuda" else cpu_batch
    shapes = [(side, side)] * LEVELS
    nq = q_side * q_side
    gen = torch.Generator().manual_seed(0)
    value = torch.randn(batch, LEVELS * side * side, HEADS, HEAD_DIM, generator=gen)
    # Reference points on the query grid plus offsets of a few pixels, as MMFuser produces them;
    # some land outside the map.
    loc = torch.rand(batch, nq, HEADS, LEVELS, POINTS, 2, generator=gen) * 1.1 - 0.05
    attn = torch.randn(batch, nq, HEADS, LEVELS * POINTS, generator=gen).softmax(-1)
    attn = attn.view(batch, nq, HEADS, LEVELS, POINTS)
    # Locations and weights stay float32, as MMFuser computes them.
    return (value.to(device, dtype), shapes, loc.to(device), attn.to(device, dtype)), {
        "batch": batch, "grid": f"{LEVELS}x{side}x{side}", "queries": nq,
    }


def implementations(device: torch.device) -> dict[str, Callable[..., Tensor]]:
    impls = {
        BASELINE: grid_sample_per_level,
        "layerfuse pytorch": lambda v, s, lc, a: ms_deform_attn(v, s, lc, a, backend="pytorch"),
    }
    if device.type == "cuda":
        impls["layerfuse triton"] = lambda v, s, lc, a: ms_deform_attn(v, s, lc, a, backend="triton")
    return impls


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], default_json="deform_attn.json")
    parser.add_argument("--settings", default="llava,highres", help="comma-separated: llava, highres")
    parser.add_argument("--dtypes", default="float32", help="comma-separated value dtypes (float32,bfloat16,...)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats, warmup = (1, 1) if args.quick else (args.repeats, args.warmup)
    results: list[Result] = []
    for device in devices_from(args.device):
        for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
            for setting in args.settings.split(","):
                (value, shapes, loc, attn), settings = make_inputs(setting, device, dtype, args.quick)
                settings = {"setting": setting, **settings}
                for name, fn in implementations(device).items():
                    def forward(f=fn, v=value, s=shapes, lc=loc, a=attn):
                        with torch.no_grad():
                            return f(v, s, lc, a)

                    results.append(measure(forward, case=name, device=device, dtype=dtype, mode="forward",
                                           warmup=warmup, repeats=repeats, settings=settings))
                    leaves = [t.detach().requires_grad_() for t in (value, loc, attn)]

                    def step(f=fn, v=leaves[0], s=shapes, lc=leaves[1], a=leaves[2]):
                        out = f(v, s, lc, a)
                        grads = torch.autograd.grad(out, (v, lc, a), torch.ones_like(out))
                        return out, grads

                    results.append(measure(step, case=name, device=device, dtype=dtype, mode="forward+backward",
                                           warmup=warmup, repeats=repeats, settings=settings))
    print_table(results, title="ms_deform_attn, median over repeats after warm-up; peak = extra memory of one call'",
                baseline=lambda r: BASELINE)
    write_json(results, args.json, benchmark="deform_attn")


if __name__ == "__main__":
    main()
