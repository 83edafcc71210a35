"""Forward and forward+backward time and peak memory of every fuser (with its LLaVA projector).

Cases live in ``benchmarks/cases/`` (one module per fuser family). Default scale is LLaVA-1.5:
576 patch tokens of width 1024 per layer, projector to 4096, batch 2.

    python benchmarks/fusers.py                 # CPU, plus CUDA when present
    python benchmarks/fusers.py --only mmfuser  # cases whose name contains "mmfuser"
    python benchmarks/fusers.py --quick         # tiny shapes: checks every case runs
    python benchmarks/fusers.py --only mmfuser_ --autocast bfloat16   # float32 modules under autocast

``mmfuser_block`` (layerfuse's MMFuser alone) is compared with ``mmfuser_authors`` (the authors'
module with per-level ``grid_sample`` sampling, same weights and inputs) in the same run; every
other row with LLaVA-1.5's projector on one layer.
"""

from __future__ import annotations

import contextlib
import statistics

import torch

from cases import BASELINE, all_cases
from harness import base_parser, devices_from, measure_interleaved, print_table, write_json


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], default_json="fusers.json")
    parser.add_argument("--only", default=None, help="run the cases whose name contains this text")
    parser.add_argument("--dtypes", default="float32", help="comma-separated dtypes (float32,bfloat16,...)")
    parser.add_argument("--autocast", default=None, choices=["bfloat16", "float16"],
                        help="also run every case under torch.autocast to this dtype (modules stay in --dtypes)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats, warmup = (1, 1) if args.quick else (args.repeats, args.warmup)
    results = []
    autocasts = [None] if args.autocast is None else [None, getattr(torch, args.autocast)]
    for device in devices_from(args.device):
        for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
            for autocast in autocasts:
                settings = {} if autocast is None else {"autocast": str(autocast).removeprefix("torch.")}
                cases = [c for c in all_cases() if not args.only or args.only in c.name or c.name == BASELINE]
                # A case and the case it is compared with are timed in turns, so both see the same load.
                groups: dict[str, list] = {}
                for case in cases:
                    groups.setdefault(RATIO_BASELINES.get(case.name, case.name), []).append(case)
                for group in groups.values():
                    results += run_cases(group, device, dtype, autocast, settings, args.quick, warmup, repeats)
    print_table(results, title="fusers (+ projector), median over repeats after warm-up; peak = extra memory of one "
                "call; ratios against LLaVA-1.5's projector on one layer (mmfuser_block: against the authors' "
                "module, mmfuser_authors, timed in turns with it)",
                baseline=lambda r: RATIO_BASELINES.get(r.case, BASELINE))
    paired = paired_ratios(results)
    for line in paired:
        print(line["text"])
    write_json(results, args.json, benchmark="fusers", extra={"threads": torch.get_num_threads(), "paired": paired})


def paired_ratios(results):
    """Speed-up of each compared case per turn (the two timed back to back), summarised.

    Under a drifting load the ratio of two medians can mislead; the median of per-turn ratios
    compares runs that saw about the same load.
    """
    lines = []
    by_key = {(r.case, r.device, r.dtype, r.mode, str(r.settings)): r for r in results}
    for r in results:
        ref = by_key.get((RATIO_BASELINES.get(r.case), r.device, r.dtype, r.mode, str(r.settings)))
        if ref is None:
            continue
        ratios = sorted(a / b for a, b in zip(ref.times_ms, r.times_ms))
        median = statistics.median(ratios)
        settings = " ".join(f"{k}={v}" for k, v in r.settings.items())
        text = (f"{r.case} vs {ref.case}, {r.dtype} {settings} {r.mode}: per-turn speed-up median {median:.2f}x "
                f"(min {ratios[0]:.2f}x, max {ratios[-1]:.2f}x, {len(ratios)} turns, "
                f"{torch.get_num_threads()} threads)")
        lines.append({"case": r.case, "baseline": ref.case, "mode": r.mode, "dtype": r.dtype,
                      "settings": r.settings, "median": median, "ratios": ratios, "text": text})
    return lines


# Rows compared with another row than the projector baseline.
RATIO_BASELINES = {"mmfuser_block": "mmfuser_authors"}


def run_cases(cases, device, dtype, autocast, settings, quick, warmup, repeats):
    """Forward and forward+backward rows of ``cases``, timed in turns."""

    def context():
        if autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=autocast)

    forwards, steps, modules = {}, {}, []
    for case in cases:
        torch.manual_seed(0)
        module, features, kwargs = case.build(device, dtype, quick)
        modules.append(module)
        leaves = [f.detach().requires_grad_() for f in features]

        def forward(m=module, f=features, k=kwargs):
            with context():
                return m(f, **k)

        def step(m=module, f=leaves, k=kwargs):
            with context():
                out = m(f, **k)
            out.float().square().mean().backward()
            m.zero_grad(set_to_none=True)
            return out

        forwards[case.name], steps[case.name] = forward, step
    common = {"device": device, "dtype": dtype, "warmup": warmup, "repeats": repeats, "settings": settings}
    for module in modules:
        module.eval()
    with torch.no_grad():
        rows = measure_interleaved(forwards, mode="forward", **common)
    for module in modules:
        module.train()
    return rows + measure_interleaved(steps, mode="forward+backward", **common)


if __name__ == "__main__":
    main()
