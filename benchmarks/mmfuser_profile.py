"""Where MMFuser's time goes, beside the authors' module: torch.profiler over forward+backward.

Both blocks (``cases/mmfuser.py``: layerfuse's ``MMFuser`` and the authors' module with per-level
``grid_sample``, same weights) run at LLaVA-1.5 scale, batch 2, in turns, in float32 and under bf16
autocast. For each, the time in matrix products (``aten::mm``/``addmm``/``bmm``: the linear layers,
identical in the two modules) and in everything else is printed, with the speed-up bound that the
shared matrix products set: the authors' time over ours with everything but the products removed.

    python benchmarks/mmfuser_profile.py --threads 1 --repeats 3
    python benchmarks/mmfuser_profile.py --top 15   # also the top operators of each module
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from torch.profiler import ProfilerActivity, profile

from cases.mmfuser import build_authors, build_block

GEMMS = ("aten::mm", "aten::addmm", "aten::bmm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3, help="profiled steps per module and setting")
    parser.add_argument("--top", type=int, default=0, help="print this many top operators per module")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    modules = {}
    for name, build in (("layerfuse", build_block), ("authors", build_authors)):
        torch.manual_seed(0)
        module, features, _ = build(torch.device("cpu"), torch.float32, False)
        modules[name] = (module, [f.detach().requires_grad_() for f in features])
    for autocast in (False, True):

        def context(autocast=autocast):
            return torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

        def step(module, features, context=context):
            with context():
                out = module(features)
            out.float().square().mean().backward()
            module.zero_grad(set_to_none=True)

        for module, features in modules.values():
            step(module, features)  # warm-up
        gemm = dict.fromkeys(modules, 0.0)
        total = dict.fromkeys(modules, 0.0)
        for _ in range(args.repeats):
            for name, (module, features) in modules.items():
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    step(module, features)
                events = prof.key_averages()
                gemm[name] += sum(e.self_cpu_time_total for e in events if e.key in GEMMS) / 1e3 / args.repeats
                total[name] += sum(e.self_cpu_time_total for e in events) / 1e3 / args.repeats
                if args.top and _ == args.repeats - 1:
                    print(f"\n{name}, autocast={autocast}")
                    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top))
        ours, theirs = "layerfuse", "authors"
        print(
            f"{'bf16 autocast' if autocast else 'float32'}, {torch.get_num_threads()} threads: "
            f"layerfuse {total[ours]:.0f} ms/step (matrix products {gemm[ours]:.0f} ms, "
            f"{gemm[ours] / total[ours]:.0%}), authors {total[theirs]:.0f} ms/step (matrix products "
            f"{gemm[theirs]:.0f} ms, {gemm[theirs] / total[theirs]:.0%}); speed-up {total[theirs] / total[ours]:.2f}x, "
            f"bound with only the matrix products left {total[theirs] / gemm[ours]:.2f}x"
        )


if __name__ == "__main__":
    main()
