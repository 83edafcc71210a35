"""Time and peak memory of the cross-attention fuser as the grid grows: full, windowed and naive.

Four key/value layers and one query layer, all on a G x G grid (G = 24, 48, 64 by default), so the
query has N = G² tokens and the keys M = 4·G². Rows per grid:

- ``naive``: the fuser with a backend written here that materialises softmax(Q·Kᵀ)·V (N x M scores);
- ``full``: the fuser on the automatically chosen backend (SDPA's fused kernels);
- ``window-dense-mask``: the windowed fuser computed as full attention with an explicit N x M window
  mask (what dense SDPA with a block mask costs);
- ``windowed``: the windowed fuser as shipped (tiles with halos, linear in N).

    python benchmarks/cross_attention_scaling.py --device cpu --repeats 3
    python benchmarks/cross_attention_scaling.py --quick
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from harness import base_parser, devices_from, measure, print_table, write_json
from layerfuse import CrossAttentionFuser
from layerfuse.layers import attention as attention_layer
from layerfuse.ops.attention import (
    AttentionBackend,
    AttentionInputs,
    attention,
    backend_names,
    register_backend,
    window_mask,
)


class NaiveBackend(AttentionBackend):
    """softmax(q·kᵀ·scale + mask)·v in the input dtype, every intermediate materialised."""

    name = "naive"

    def apply(self, inputs: AttentionInputs) -> Tensor:
        q, k, v = inputs.query, inputs.key, inputs.value
        scale = q.shape[-1] ** -0.5 if inputs.scale is None else inputs.scale
        scores = q @ k.transpose(-2, -1) * scale
        if inputs.mask is not None:
            scores = scores + inputs.mask
        return scores.softmax(dim=-1) @ v


@contextlib.contextmanager
def dense_window_mask() -> Iterator[None]:
    """Run windowed fusers as full attention under the explicit (N, M) window mask."""

    def dense(q, k, v, *, query_grid, key_grids, window, dropout_p=0.0, scale=None, backend="auto", tile=None):
        mask = window_mask(query_grid, key_grids, window, device=q.device)
        return attention(q, k, v, mask=mask, dropout_p=dropout_p, scale=scale, backend=backend)

    original = attention_layer.windowed_attention
    attention_layer.windowed_attention = dense
    try:
        yield
    finally:
        attention_layer.windowed_attention = original


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], default_json="cross_attention_scaling.json")
    parser.add_argument("--grids", default="24,48,64", help="comma-separated grid sides G")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--levels", type=int, default=4, help="key/value layers")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--window", type=int, default=7)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--backward", action="store_true", help="also time forward+backward")
    parser.add_argument("--skip-naive-above", type=int, default=64, help="skip the naive row for G above this")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    grids = [4, 6] if args.quick else [int(g) for g in args.grids.split(",")]
    dim, heads, window = (32, 2, 3) if args.quick else (args.dim, args.heads, args.window)
    repeats, warmup = (1, 1) if args.quick else (args.repeats, args.warmup)
    dtype = getattr(torch, args.dtype)
    if "naive" not in backend_names():
        register_backend(NaiveBackend())

    variants = [
        ("naive", {"backend": "naive"}, contextlib.nullcontext),
        ("full", {}, contextlib.nullcontext),
        ("window-dense-mask", {"window": window}, dense_window_mask),
        ("windowed", {"window": window}, contextlib.nullcontext),
    ]
    modes = ["forward", "forward+backward"] if args.backward else ["forward"]
    results = []
    for device in devices_from(args.device):
        for g in grids:
            torch.manual_seed(0)
            feats = [torch.randn(args.batch, g * g, dim, device=device, dtype=dtype) for _ in range(args.levels + 1)]
            settings = {"grid": f"{g}x{g}", "N": g * g, "M": args.levels * g * g}
            for name, kwargs, context in variants:
                if name == "naive" and g > args.skip_naive_above:
                    continue
                fuser = CrossAttentionFuser(dim, args.levels, heads, grid=(g, g), device=device, dtype=dtype, **kwargs)
                for mode in modes:
                    leaves = [f.detach().requires_grad_(mode != "forward") for f in feats]

                    def run(m=fuser, f=leaves, mode=mode):
                        if mode == "forward":
                            with torch.no_grad():
                                return m(f)
                        out = m(f)
                        out.float().square().mean().backward()
                        return out

                    with context():
                        results.append(measure(run, case=name, device=device, dtype=dtype, mode=mode,
                                               warmup=warmup, repeats=repeats, settings=settings))
                    print(f"{name:18s} {settings['grid']:6s} {mode:17s} {results[-1].median_ms:9.1f} ms "
                          f"{results[-1].peak_mib:9.1f} MiB", flush=True)
    print_table(results, title=f"cross-attention fuser scaling (dim={dim}, heads={heads}, levels={args.levels}, "
                                f"batch={args.batch}, window={window}); ratios vs naive",
                baseline=lambda r: "naive")
    write_json(results, args.json, benchmark="cross_attention_scaling",
               extra={"dim": dim, "heads": heads, "levels": args.levels, "batch": args.batch, "window": window})


if __name__ == "__main__":
    main()
