"""Prefill and training-step cost of internal fusion (I_D, I_M, DeepStack) against the plain LLM.

A random-weight LLaMA-shaped decoder (default 4 layers of width 2048, intermediate 5632, 16 heads) reads
one image block of 576 tokens plus text; the visual levels are CLIP-L-wide (1024) random features.
Rows:

- ``plain``: the LLM alone (what a user runs without internal fusion, e.g. LLaVA's input-only splice);
- ``I_D``: [`InternalDirect`] with Lin et al.'s ``3-18-23`` map (three mlp2x_gelu projectors);
- ``I_M``: [`InternalModular`] (corrected mode) with the ``18`` map (one gated cross-attention block,
  as large as a decoder layer) and ``I_M x3`` with three blocks;
- ``DeepStack``: three 2x2 patch mergers added after decoder layers 0, 1, 2 (Qwen3-VL);
- ``... projectors``: the fusion's projectors/mergers alone, so that the cost of the injection
  itself is ``fused - plain - projectors``.

``prefill`` is a no-grad forward of the whole prompt; ``train`` is forward + backward of the LM loss
with every LLM and fusion parameter trainable (no optimiser step). The cases run interleaved, one
call each per round, and the median over rounds is reported, so load drift on a shared machine
affects every row alike.

    python benchmarks/internal_fusion.py --device cpu --threads 2 --repeats 3
    python benchmarks/internal_fusion.py --width 1024 --layers 4   # scaled down for a small CPU
    python benchmarks/internal_fusion.py --flops-only                # exact FLOPs at full size, in seconds
    python benchmarks/internal_fusion.py --quick
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from harness import base_parser, devices_from, measure, print_table, write_json
from layerfuse.internal import DeepStack, InternalDirect, InternalModular, lin_layer_map
from layerfuse.internal.base import image_positions


def build_llm(width: int, layers: int, heads: int, vocab: int, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=width, intermediate_size=int(width * 2.75), num_hidden_layers=layers, num_attention_heads=heads,
        vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def attached(fusion, llm, step):
    """``step`` with ``fusion`` attached to ``llm`` for its duration (hooks cost microseconds)."""

    def call():
        fusion.attach(llm)
        try:
            return step()
        finally:
            fusion.detach()

    return call


def interleaved(cases, *, device, dtype, mode, warmup, rounds, settings, flops):
    """Median time per case over ``rounds`` rounds that run every case once, in turn, so that the load
    drift of a shared machine hits all cases alike; peak memory and FLOPs (torch's FlopCounterMode,
    matmuls and attention) from one more call each, written into ``flops[(case, mode)]``."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    results = []
    for name, fn in cases.items():
        with FlopCounterMode(display=False) as counter:
            fn()
        flops[(name, mode)] = counter.get_total_flops()
        memory = measure(fn, case=name, device=device, dtype=dtype, mode=mode, warmup=0, repeats=1, settings=settings)
        results.append(replace(memory, median_ms=statistics.median(times[name]), repeats=rounds, times_ms=times[name]))
    return results


def bench_device(device: torch.device, dtype: torch.dtype, args, warmup: int, repeats: int, flops: dict):
    """Every row on one device; returns the results and the parameter counts."""
    results = []
    width, image_tokens = args.width, args.image_tokens
    torch.manual_seed(0)
    llm = build_llm(width, args.layers, args.heads, args.vocab, device, dtype)
    length = image_tokens + args.text_tokens
    ids = torch.randint(1, args.vocab, (1, length), device=device)
    mask = torch.zeros(1, length, dtype=torch.bool, device=device)
    mask[:, args.text_tokens // 2: args.text_tokens // 2 + image_tokens] = True
    dd = {"device": device, "dtype": dtype}
    fusions = {
        "I_D": InternalDirect(args.vit_width, width, lin_layer_map("3-18-23", args.layers), **dd),
        "I_M": InternalModular(args.vit_width, width, lin_layer_map("18", args.layers), num_heads=args.heads,
                               intermediate_size=int(width * 2.75), **dd),
        "I_M x3": InternalModular(args.vit_width, width, lin_layer_map("3-18-23", args.layers),
                                  num_heads=args.heads, intermediate_size=int(width * 2.75), **dd),
        "DeepStack": DeepStack(args.vit_width, width, num_levels=3, **dd),
    }
    settings = {"width": width, "layers": args.layers, "tokens": length, "image_tokens": image_tokens}

    def run(mode: str, fusion=None, levels=None):
        def prefill():
            with torch.no_grad():
                return llm(input_ids=ids).logits

        def train():
            llm.zero_grad(set_to_none=True)
            if fusion is not None:
                fusion.zero_grad(set_to_none=True)
            loss = llm(input_ids=ids, labels=ids).loss
            loss.backward()
            return loss.detach()

        step = prefill if mode == "prefill" else train
        if fusion is None:
            return step

        def fused():
            with fusion.inject(levels, mask):
                return step()

        return fused

    def projectors_only(mode: str, fusion, levels):
        modules = fusion.mergers if isinstance(fusion, DeepStack) else fusion.projectors

        def step():
            with torch.set_grad_enabled(mode == "train"):
                total = sum(m(x).sum() for m, x in zip(modules, levels))
            if mode == "train":
                fusion.zero_grad(set_to_none=True)
                total.backward()
            return total.detach()

        return step

    for mode in ("prefill", "train"):
        cases = {"plain": run(mode)}
        for name, fusion in fusions.items():
            per_token = 4 if isinstance(fusion, DeepStack) else 1
            levels = [torch.randn(image_tokens * per_token, args.vit_width, **dd) for _ in fusion.fused_layers]
            cases[name] = attached(fusion, llm, run(mode, fusion, levels))
            cases[f"{name} projectors"] = projectors_only(mode, fusion, levels)
        results += interleaved(cases, device=device, dtype=dtype, mode=mode, warmup=warmup, rounds=repeats,
                               settings=settings, flops=flops)
    params = {name: sum(p.numel() for p in f.parameters()) for name, f in fusions.items()}
    params["plain LLM"] = sum(p.numel() for p in llm.parameters())
    return results, params


def flops_only(args) -> None:
    """Exact FLOPs of every case at full size on the meta device (no memory, no time): the plain LLM, each
    fusion, and each fusion's projectors alone."""
    meta = torch.device("meta")
    width, layers, image_tokens, c = args.width, args.layers, args.image_tokens, args.vit_width
    llm = build_llm(width, layers, args.heads, args.vocab, meta, torch.float32)
    length = image_tokens + args.text_tokens
    ids = torch.zeros(1, length, dtype=torch.long, device=meta)
    mask = torch.zeros(1, length, dtype=torch.bool)
    mask[:, args.text_tokens // 2: args.text_tokens // 2 + image_tokens] = True
    inter = int(width * 2.75)
    fusions = {
        "I_D": InternalDirect(c, width, lin_layer_map("3-18-23", layers), device=meta),
        "I_M": InternalModular(c, width, lin_layer_map("18", layers), num_heads=args.heads, intermediate_size=inter,
                               device=meta),
        "I_M x3": InternalModular(c, width, lin_layer_map("3-18-23", layers), num_heads=args.heads,
                                  intermediate_size=inter, device=meta),
        "DeepStack": DeepStack(c, width, num_levels=3, device=meta),
    }

    def count(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    def step(mode):
        def call():
            if mode == "prefill":
                with torch.no_grad():
                    llm(input_ids=ids)
            else:
                llm(input_ids=ids, labels=ids).loss.backward()
        return call

    plain = {mode: count(step(mode)) for mode in ("prefill", "train")}
    print(f"\nFLOPs, LLaMA {layers} x {width}, {image_tokens} image tokens (meta device); plain LLM: "
          f"prefill {plain['prefill'] / 1e9:.1f} GFLOP, train step {plain['train'] / 1e9:.1f} GFLOP, "
          f"{sum(p.numel() for p in llm.parameters()) / 1e6:.1f} M parameters")
    for name, fusion in fusions.items():
        per_token = 4 if isinstance(fusion, DeepStack) else 1
        fusion.attach(llm)
        # set_inputs needs real mask values (nonzero); build the positions from a CPU mask and keep the
        # levels shape-only on the meta device
        fusion._inputs = image_positions(
            [torch.zeros(image_tokens * per_token, c, device=meta) for _ in fusion.fused_layers], mask)
        modules = fusion.mergers if isinstance(fusion, DeepStack) else fusion.projectors
        for mode in ("prefill", "train"):
            fused = count(step(mode))

            def alone(mode=mode, modules=modules, levels=fusion._inputs.levels):
                with torch.set_grad_enabled(mode == "train"):
                    total = sum(m(x).sum() for m, x in zip(modules, levels))
                if mode == "train":
                    total.backward()

            projectors = count(alone)
            print(f"  {name:10s} {mode:8s} +{100 * (fused - plain[mode]) / plain[mode]:5.1f} % in all, "
                  f"{100 * (fused - plain[mode] - projectors) / plain[mode]:+6.2f} % beyond the projectors; "
                  f"{sum(p.numel() for p in fusion.parameters()) / 1e6:.1f} M parameters")
        fusion.clear_inputs()
        fusion.detach()


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], default_json="internal_fusion.json")
    parser.add_argument("--width", type=int, default=2048, help="LLM hidden size")
    parser.add_argument("--layers", type=int, default=4, help="LLM decoder layers")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=4096, help="kept small so lm_head does not dominate")
    parser.add_argument("--image-tokens", type=int, default=576)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--vit-width", type=int, default=1024)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--flops-only", action="store_true",
                        help="count FLOPs at full size on the meta device instead of timing (seconds, any machine)")
    args = parser.parse_args()
    if args.flops_only:
        flops_only(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.width, args.layers, args.heads, args.vocab, args.image_tokens, args.text_tokens, args.vit_width = (
            64, 4, 4, 128, 16, 8, 32)
    repeats, warmup = (1, 1) if args.quick else (args.repeats, args.warmup)
    dtype = getattr(torch, args.dtype)
    width, image_tokens = args.width, args.image_tokens
    results = []
    params: dict[str, int] = {}
    flops: dict[tuple[str, str], int] = {}
    for device in devices_from(args.device):
        rows, params = bench_device(device, dtype, args, warmup, repeats, flops)
        results += rows
    print_table(results, title=f"internal fusion, LLaMA {args.layers} x {width}, {image_tokens} image tokens, "
                               f"threads={torch.get_num_threads()}; ratios vs plain",
                baseline=lambda r: "plain")
    by = {(r.case, r.mode): r.median_ms for r in results if r.device == results[0].device}
    names = [k for k in params if k != "plain LLM"]
    print("\ncost of the injection itself, (fused - plain - projectors alone) / plain: time (noisy on a shared "
          "CPU) and FLOPs (exact)")
    for name in names:
        for mode in ("prefill", "train"):
            extra = by[(name, mode)] - by[("plain", mode)] - by[(f"{name} projectors", mode)]
            plain_flops = flops[("plain", mode)]
            total = 100 * (flops[(name, mode)] - plain_flops) / plain_flops
            beyond = 100 * (flops[(name, mode)] - plain_flops - flops[(f"{name} projectors", mode)]) / plain_flops
            print(f"  {name:10s} {mode:8s} time {100 * extra / by[('plain', mode)]:+6.1f} %   FLOPs {total:+6.1f} % in all, "
                  f"{beyond:+6.2f} % beyond the projectors")
    print("\nparameters:", ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in params.items()))
    write_json(results, args.json, benchmark="internal_fusion",
               extra={"parameters": params, "flops": {f"{c} {m}": v for (c, m), v in flops.items()}, **vars(args)})


if __name__ == "__main__":
    main()
