"""MMFuser inside a Hugging Face LLaVA model: fuse, train a few steps, generate, save, reload.

A tiny LLaVA-1.5 (a CLIP tower with 8 blocks, a 2-layer Llama, random weights) gets an MMFuser fusion
projector in place of its ``multi_modal_projector``. Stage 1 trains only the fusion projector on a
synthetic image-caption task (each image's colour names its caption); then the model generates,
is saved, and is reloaded through ``AutoModelForImageTextToText`` with the same logits. Needs
``layerfuse[hf]``; nothing is downloaded; under a minute on two cores.

    python examples/hf_llava_mmfuser.py
"""

from __future__ import annotations

import tempfile

import torch
from transformers import (
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from layerfuse import FusionProjector, LayerTap, MMFuser, Projector
from layerfuse.integrations.transformers import fuse_llava, fusion_parameters, set_training_stage

IMAGE, PATCH, IMAGE_TOKEN = 32, 8, 127
TOKENS = (IMAGE // PATCH) ** 2  # 16 visual tokens per image
COLOURS = 4


def tiny_llava() -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                              image_size=IMAGE, patch_size=PATCH)
    text = LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                     image_token_index=IMAGE_TOKEN, image_seq_length=TOKENS))


def captions(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Noisy single-colour images; the caption after the image tokens is two words naming the colour."""
    colour = torch.randint(COLOURS, (n,), generator=generator)
    palette = torch.linspace(-1.5, 1.5, COLOURS)[:, None, None, None].expand(COLOURS, 3, 1, 1)
    pixel_values = palette[colour] + 0.2 * torch.randn(n, 3, IMAGE, IMAGE, generator=generator)
    ids = torch.cat([torch.ones(n, 1, dtype=torch.long), torch.full((n, TOKENS), IMAGE_TOKEN),
                     torch.stack([10 + colour, 20 + colour, torch.full_like(colour, 2)], dim=1)], dim=1)
    labels = ids.clone()
    labels[:, :1 + TOKENS] = -100  # loss on the caption only
    return {"input_ids": ids, "labels": labels, "pixel_values": pixel_values}


def main() -> None:
    torch.manual_seed(0)
    # MMFuser (Cao et al., 2024): the penultimate layer queries four shallower ones by deformable attention
    module = FusionProjector(MMFuser(64, num_levels=4, heads=4, points=4), Projector("mlp2x_gelu", 64, 96),
                             layers=[1, 3, 5, 6, -2], tokens="patch")
    model = fuse_llava(tiny_llava(), module)
    print(type(model).__name__, "| fusion config stored:", model.config.fusion["fuser"]["class"])

    model = set_training_stage(model, 1).train()  # stage 1: only the fusion projector trains
    optimiser = torch.optim.AdamW(fusion_parameters(model), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(25):
        loss = model(**captions(8, g)).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 6 == 0 or step == 24:
            print(f"step {step:2d}: loss {loss.item():.3f}")

    model.eval()
    batch = captions(2, torch.Generator().manual_seed(1))
    prompt = batch["input_ids"][:, :1 + TOKENS]
    with torch.no_grad():
        # the image features equal the layerfuse pipeline on the model's own tower
        with LayerTap(model.model.vision_tower, module.layers, tokens=module.tokens) as tap:
            expected = module(tap(batch["pixel_values"]))
        features = torch.stack(model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output)
        print("features equal the pipeline:", torch.equal(features, expected))
        out = model.generate(input_ids=prompt, pixel_values=batch["pixel_values"], max_new_tokens=3,
                             do_sample=False, pad_token_id=0)
        print("generated:", out[:, prompt.shape[1]:].tolist(), "| captions:", batch["input_ids"][:, -3:].tolist())
        logits = model(input_ids=prompt, pixel_values=batch["pixel_values"]).logits

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        reloaded = AutoModelForImageTextToText.from_pretrained(folder).eval()
        with torch.no_grad():
            same = torch.equal(reloaded(input_ids=prompt, pixel_values=batch["pixel_values"]).logits, logits)
    print(f"reloaded as {type(reloaded).__name__}; same logits: {same}")


if __name__ == "__main__":
    main()
