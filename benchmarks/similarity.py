"""Throughput (images/s) of layer_similarity for each metric on a ViT-B/16-shaped model.

Random-weight timm ``vit_base_patch16_224`` (12 blocks, 13 hidden states, 196 patch tokens of width
768), all hidden states compared, batch 8. The ``tap only`` row runs the same tapped forward with no
reduction: the difference to it is the metric's own cost. Times cover ``--batches`` batches.

    python benchmarks/similarity.py --device cpu --repeats 3
    python benchmarks/similarity.py --quick      # tiny model: checks the script runs
"""

from __future__ import annotations

import torch

from harness import base_parser, devices_from, measure, print_table, write_json
from layerfuse import LayerTap
from layerfuse.analysis import METRICS, layer_similarity


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], default_json="similarity.json")
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm model name (random weights)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=2, help="batches per timed run")
    parser.add_argument("--metrics", default=",".join(METRICS), help="comma-separated metrics to time")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import timm

    name, image_size = ("test_vit", 32) if args.quick else (args.model, 224)
    repeats, warmup = (1, 0) if args.quick else (args.repeats, min(args.warmup, 1))
    results, throughput = [], []
    for device in devices_from(args.device):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, img_size=image_size).to(device).eval()
        batches = [torch.randn(args.batch_size, 3, image_size, image_size, device=device)
                   for _ in range(args.batches)]
        num_images = args.batch_size * args.batches
        settings = {"model": name, "batch": args.batch_size, "batches": args.batches, "layers": "all"}

        def tap_only(model=model, batches=batches):
            with LayerTap(model, "all") as tap, torch.inference_mode():
                return [tap(x) for x in batches][-1][0].sum()

        cases = [("tap only", tap_only)]
        for metric in args.metrics.split(","):
            cases.append((metric, lambda m=metric, model=model, batches=batches: layer_similarity(
                model, batches, metric=m, progress=False)))
        for case, fn in cases:
            row = measure(fn, case=case, device=device, dtype=torch.float32, mode="inference", warmup=warmup,
                          repeats=repeats, settings=settings)
            results.append(row)
            throughput.append((case, device.type, num_images / (row.median_ms / 1e3)))
            print(f"{case} on {device.type}: {row.median_ms:.0f} ms, {throughput[-1][2]:.2f} images/s", flush=True)
    print_table(results, title="layer_similarity: time for all batches (sums in float64); peak = extra memory of one run")
    print("\nthroughput")
    for case, device, rate in throughput:
        print(f"  {case:<14} {device:<5} {rate:8.2f} images/s")
    write_json(results, args.json, benchmark="similarity",
               extra={"images_per_s": {f"{c}/{d}": r for c, d, r in throughput}})


if __name__ == "__main__":
    main()
