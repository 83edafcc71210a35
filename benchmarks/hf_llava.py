"""Fused HF LLaVA models against the stock one: image features, prefill and a stage-1 training step.

LLaVA-1.5 shapes: a CLIP ViT-L/14-336 tower (24 blocks, width 1024, 576 patch tokens, random weights)
and a small LLM of LLaVA-7B's width (2 Llama layers, hidden 4096, MLP 11008; vocabulary 1024 so the
embedding and head do not hide the rest), so the fusion's share of the time is visible. Rows:

- ``image features``: ``get_image_features`` (tower + fusion + projector), no grad;
- ``prefill``: the whole forward on one prompt (image tokens + 32 text tokens), no grad;
- ``train step (stage 1)``: forward with labels and backward, only the fusion projector trainable
  (the gradient still flows back through the LLM to the image tokens).

The stock model taps one layer (-2) and runs the tower to its end; the fused models stop the tower
after their deepest layer. Peak = extra memory of one call (see ``harness.py``).

    python benchmarks/hf_llava.py --device cpu --batch 1 --repeats 1 --warmup 1
    python benchmarks/hf_llava.py --quick      # tiny shapes: checks every case runs
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from harness import base_parser, devices_from, measure, print_table, write_json
from layerfuse import CrossAttentionFuser, FusionProjector, InstructionGatedFuser, MMFuser, Projector
from layerfuse.integrations.transformers import fuse_llava, set_training_stage
from layerfuse.presets import build_fusion_projector

BASELINE = "stock HF LLaVA (layer -2)"
TEXT_TOKENS, IMAGE_TOKEN, VOCAB = 32, 1023, 1024
FULL = {"width": 1024, "depth": 24, "heads": 16, "image": 336, "patch": 14, "llm": 4096, "mlp": 11008,
        "llm_heads": 32}
QUICK = {"width": 64, "depth": 24, "heads": 4, "image": 56, "patch": 14, "llm": 128, "mlp": 256, "llm_heads": 4}


def stock_llava(s: dict[str, int], device: torch.device, dtype: torch.dtype) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(hidden_size=s["width"], intermediate_size=4 * s["width"], num_hidden_layers=s["depth"],
                              num_attention_heads=s["heads"], image_size=s["image"], patch_size=s["patch"])
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=s["llm"], intermediate_size=s["mlp"], num_hidden_layers=2,
                       num_attention_heads=s["llm_heads"], num_key_value_heads=s["llm_heads"],
                       max_position_embeddings=2048)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                         image_seq_length=(s["image"] // s["patch"]) ** 2)
    return LlavaForConditionalGeneration(config).to(device=device, dtype=dtype).eval()


def fusion_cases(s: dict[str, int]) -> dict[str, Callable[[], FusionProjector]]:
    width, llm, heads, depth = s["width"], s["llm"], s["heads"], s["depth"]

    def attach(fuser: Any, layers: Any, tokens: str = "patch") -> FusionProjector:
        return FusionProjector(fuser, Projector("mlp2x_gelu", fuser.out_dim, llm), layers=layers, tokens=tokens)

    mm_layers = (-22, -17, -12, -7, -2)
    igva = lambda: InstructionGatedFuser(width, 768, gate_dim=min(width, 1024))  # noqa: E731
    return {
        "Dense Connector DCI": lambda: build_fusion_projector("dense_connector_dci", dim=width, llm_dim=llm,
                                                             depth=depth),
        "Dense Connector STI (720 tokens)": lambda: build_fusion_projector("dense_connector_sti", dim=width,
                                                                            llm_dim=llm, depth=depth),
        "COMM LLN (24 layers)": lambda: build_fusion_projector("comm_clip", dim=width, llm_dim=llm, depth=depth),
        "MMFuser": lambda: attach(MMFuser(width, heads=heads), mm_layers),
        "cross-attention 3x3": lambda: attach(CrossAttentionFuser(width, heads=heads, window=3), mm_layers),
        "IGVA": lambda: (lambda f: attach(f, f.layers, "cls_patch"))(igva()),
    }


def batch_for(model: Any, tokens: int, batch: int, s: dict[str, int], device: torch.device,
              dtype: torch.dtype, igva: bool) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, IMAGE_TOKEN - 1, (batch, 1 + tokens + TEXT_TOKENS), device=device)
    ids[:, 1:1 + tokens] = IMAGE_TOKEN
    labels = ids.masked_fill(ids == IMAGE_TOKEN, -100)
    out = {"input_ids": ids, "labels": labels,
           "pixel_values": torch.randn(batch, 3, s["image"], s["image"], device=device, dtype=dtype)}
    if igva:
        out["instruction_embeds"] = torch.nn.functional.normalize(torch.randn(batch, 768, device=device), dim=-1)
    return out


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], default_json="hf_llava.json")
    parser.add_argument("--batch", type=int, default=1, help="images per step (default: 1)")
    parser.add_argument("--only", default=None,
                        help="comma-separated texts: run the fused cases whose name contains one of them")
    parser.add_argument("--modes", default="image features,prefill,train step",
                        help="comma-separated rows to measure (default: all three)")
    args = parser.parse_args()
    modes = set(args.modes.split(","))
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats, warmup = (1, 1) if args.quick else (args.repeats, args.warmup)
    s = QUICK if args.quick else FULL
    results = []
    image_tokens: dict[str, int] = {}
    for device in devices_from(args.device):
        dtype = torch.float32
        torch.manual_seed(0)
        stock = stock_llava(s, device, dtype)
        models: list[tuple[str, Any, bool]] = [(BASELINE, stock, False)]
        for name, build in fusion_cases(s).items():
            if args.only and not any(text in name for text in args.only.split(",")):
                continue
            module = build().to(device=device, dtype=dtype)
            igva = isinstance(module.fuser, InstructionGatedFuser)
            models.append((name, fuse_llava(stock, module), igva))
        for name, model, igva in models:
            with torch.no_grad():
                extra = {"instruction_embeds": torch.zeros(1, 768, device=device)} if igva else {}
                probe = model.get_image_features(pixel_values=torch.zeros(1, 3, s["image"], s["image"],
                                                                          device=device, dtype=dtype), **extra)
            tokens = int(probe.pooler_output[0].shape[0])
            inputs = batch_for(model, tokens, args.batch, s, device, dtype, igva)
            image_kwargs = {k: v for k, v in inputs.items() if k in ("pixel_values", "instruction_embeds")}
            image_tokens[name] = tokens
            settings = {"batch": args.batch}
            model.eval()
            with torch.no_grad():
                if "image features" in modes:
                    results.append(measure(lambda m=model, k=image_kwargs: m.get_image_features(**k), case=name,
                                           device=device, dtype=dtype, mode="image features", warmup=warmup,
                                           repeats=repeats, settings=settings))
                prefill = {k: v for k, v in inputs.items() if k != "labels"}
                if "prefill" in modes:
                    results.append(measure(lambda m=model, k=prefill: m(**k, logits_to_keep=1), case=name,
                                           device=device, dtype=dtype, mode="prefill", warmup=warmup,
                                           repeats=repeats, settings=settings))
            if "train step" not in modes:
                print(f"done: {name}", flush=True)
                continue
            if model is stock:
                stock.requires_grad_(False)
                stock.model.multi_modal_projector.requires_grad_(True)
            else:
                set_training_stage(model, 1)
            model.train()

            def step(m: Any = model, k: dict[str, torch.Tensor] = inputs) -> torch.Tensor:
                loss = m(**k).loss
                loss.backward()
                m.zero_grad(set_to_none=True)
                return loss.detach()

            results.append(measure(step, case=name, device=device, dtype=dtype, mode="train step (stage 1)",
                                   warmup=warmup, repeats=repeats, settings=settings))
            print(f"done: {name}", flush=True)
    print_table(results, title=f"HF LLaVA with fused image features: CLIP ViT-L/14-336-shaped tower + 2-layer LLM of "
                f"width {s['llm']}; threads={torch.get_num_threads()}; ratios against the stock model",
                baseline=lambda r: BASELINE)
    print("image tokens per image: " + ", ".join(f"{k}: {v}" for k, v in image_tokens.items()))
    write_json(results, args.json, benchmark="hf_llava", extra={"shapes": s, "image_tokens": image_tokens})


if __name__ == "__main__":
    main()
