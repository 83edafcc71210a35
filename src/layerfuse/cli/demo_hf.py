"""The demo's end-to-end section: a tiny Hugging Face LLaVA with a fused MMFuser projector, text in, text out.

Needs ``transformers`` (the ``hf`` extra); without it the section is skipped with a one-line note, so the
demo keeps working on a core install.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from .._optional import install_hint, is_available
from .table import Table

if TYPE_CHECKING:
    from .demo import DemoContext

__all__ = ["hf_step"]

WORDS = ("a", "the", "cat", "dog", "red", "blue", "sits", "on", "mat", "sofa", "image", "shows", "what", "is", "in", "?")
IMAGE_SIZE, PATCH = 64, 16


def _tokenizer() -> Any:
    """A word-level tokenizer over a few words, built in memory (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(("<pad>", "<s>", "</s>", "<unk>", "<image>", *WORDS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _tiny_llava(tokenizer: Any, device: torch.device) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(
        "<image>"), image_seq_length=(IMAGE_SIZE // PATCH) ** 2)
    return LlavaForConditionalGeneration(config).to(device).eval()


def hf_step(ctx: DemoContext) -> Table:
    """Fuse MMFuser into a tiny HF LLaVA, then tokenise a prompt, generate and decode."""
    title = "End to end in a Hugging Face LLaVA (tiny LLM, random weights)"
    if not is_available("transformers"):
        return Table(title, ("status",), [(f"skipped: needs transformers ({install_hint('hf')})",)])
    from ..fusers import FusionProjector, MMFuser
    from ..integrations.transformers import fuse_llava
    from ..layers import Projector

    tokenizer = _tokenizer()
    llava = _tiny_llava(tokenizer, ctx.device)
    module = FusionProjector(MMFuser(64, num_levels=4, heads=4, points=4, device=ctx.device),
                             Projector("mlp2x_gelu", 64, 64, device=ctx.device), layers=(1, 3, 5, 6, -2))
    model = fuse_llava(llava, module)
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, device=ctx.device)
    placeholders = " ".join(["<image>"] * model.config.image_seq_length)
    prompts = [f"<s> {placeholders} what is in the image ?", f"<s> {placeholders} the image shows"]
    tokenizer.padding_side = "left"  # batched generation pads on the left
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(ctx.device)
    start = time.perf_counter()
    with torch.inference_mode():
        # a random LLM may pick the placeholder token itself; a trained one never does
        out = model.generate(**batch, pixel_values=images, max_new_tokens=6, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, suppress_tokens=[model.config.image_token_id])
    elapsed_ms = (time.perf_counter() - start) * 1e3
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    rows = [(p.replace(placeholders, f"<image> x{model.config.image_seq_length}"), repr(t))
            for p, t in zip(prompts, texts)]
    notes = [
        f"{type(model).__name__}: CLIP tower (8 blocks) -> LayerTap {list(module.layers)} -> MMFuser -> "
        f"projector -> 2-layer Llama; greedy generate with the KV cache in {elapsed_ms:.0f} ms "
        "(image features computed once, at prefill). Random weights: the words are noise.",
    ]
    return Table(title, ("prompt", "generated"), rows, notes)
