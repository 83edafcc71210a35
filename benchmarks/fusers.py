"""Forward and forward+backward time and peak memory of every fuser (with its LLaVA projector).

Cases live in ``benchmarks/cases/`` (one module per fuser family). Default scale is LLaVA-1.5:
576 patch tokens of width 1024 per layer, projector to 4096, batch 2.

    python benchmarks/fusers.py                 # CPU, plus CUDA when present
    python benchmarks/fusers.py --only mmfuser  # cases whose name contains "mmfuser"
    python benchmarks/fusers.py --quick         # tiny shapes: checks every case runs
"""

from __future__ import annotations

import torch

from cases import BASELINE, all_cases
from harness import base_parser, devices_from, measure, print_table, write_json


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], default_json="fusers.json")
    parser.add_argument("--only", default=None, help="run the cases whose name contains this text")
    parser.add_argument("--dtypes", default="float32", help="comma-separated dtypes (float32,bfloat16,...)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats, warmup = (1, 1) if args.quick else (args.repeats, args.warmup)
    results = []
    for device in devices_from(args.device):
        for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
            for case in all_cases():
                if args.only and args.only not in case.name and case.name != BASELINE:
                    continue
                torch.manual_seed(0)
                module, features, kwargs = case.build(device, dtype, args.quick)
                module.eval()
                with torch.no_grad():
                    results.append(measure(lambda m=module, f=features, k=kwargs: m(f, **k), case=case.name,
                                           device=device, dtype=dtype, mode="forward", warmup=warmup,
                                           repeats=repeats))
                module.train()
                leaves = [f.detach().requires_grad_() for f in features]

                def step(m=module, f=leaves, k=kwargs):
                    out = m(f, **k)
                    out.float().square().mean().backward()
                    m.zero_grad(set_to_none=True)
                    return out

                results.append(measure(step, case=case.name, device=device, dtype=dtype,
                                       mode="forward+backward", warmup=warmup, repeats=repeats))
    print_table(results, title="fusers (+ projector), median over repeats after warm-up; peak = extra memory of one "
                "call; ratios against LLaVA-1.5's projector on one layer", baseline=lambda r: BASELINE)
    write_json(results, args.json, benchmark="fusers")


if __name__ == "__main__":
    main()
