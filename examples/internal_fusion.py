"""Inject multi-layer ViT features inside an LLM's decoder layers: I_D, I_M and DeepStack, offline.

A random-weight 24-block CLIP-style tower (4 x 4 patches) and a random 8-layer Llama stand in for
CLIP-L/14-336 and the LLM. One tower forward through a LayerTap gives both the LLM input tokens
(hidden state 23, LLaVA-style splice) and the injected levels (3, 18, 23). Each fusion is attached
to the unmodified LLM, trained for one step, used in generate, then detached. Nothing is downloaded.

    python examples/internal_fusion.py
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from layerfuse import LayerTap, Projector
from layerfuse.internal import DeepStack, InternalDirect, InternalModular, lin_layer_map

IMAGE_ID = 63

torch.manual_seed(0)
vit = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                       num_hidden_layers=24, image_size=16, patch_size=4)).eval()
llm = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, pad_token_id=0))
tap = LayerTap(vit, [3, 18, 23])  # patch tokens of hidden states 3, 18, 23: 16 tokens each
input_projector = Projector("mlp2x_gelu", 32, 64)  # LLaVA's mm_projector for the input tokens

# two prompts, left-padded: the first holds one image (16 tokens), the second no image
images = torch.randn(1, 3, 16, 16)
prompt = [1, 5, *[IMAGE_ID] * 16, 7, 8]
input_ids = torch.tensor([prompt, [0] * (len(prompt) - 3) + [1, 9, 10]])
attention_mask = (input_ids != 0).long()
image_token_mask = input_ids == IMAGE_ID  # the positions the model already knows


def embed(levels):
    """LLaVA's splice: the image tokens' embeddings are the projected last level."""
    embeds = llm.get_input_embeddings()(input_ids)
    return embeds.masked_scatter(image_token_mask[..., None], input_projector(levels[-1]))


N = llm.config.num_hidden_layers
fusions = {
    # Lin et al. I_D: ViT layers 3/18/23 added before decoder layers int(kN/24 - 1) = 0, 5, 6
    "I_D": InternalDirect(32, 64, lin_layer_map("3-18-23", N)),
    # Lin et al. I_M, corrected mode (default): gated cross-attention blocks, exact identity at init
    "I_M": InternalModular(32, 64, lin_layer_map("3-18-23", N), num_heads=4, num_kv_heads=2, intermediate_size=128),
    # DeepStack: levels added after decoder layers 0, 1, 2 (Qwen3-VL). Qwen3-VL merges 2x2 patches
    # (projector="patch_merger", the default, with window_order'ed tokens) as its input tokens are
    # merged too; here the input tokens are per patch, so each level gets a per-patch projector.
    "DeepStack": DeepStack(32, 64, num_levels=3, projector="mlp2x_gelu"),
}

for name, fusion in fusions.items():
    keys_before = list(llm.state_dict())
    fusion.attach(llm)
    assert list(llm.state_dict()) == keys_before  # the LLM's own keys never change
    optimizer = torch.optim.AdamW([*fusion.parameters(), *input_projector.parameters()], lr=1e-3)

    levels = tap(images)  # LayerFeatures: 3 x (1, 16, 32)
    with fusion.inject(levels, image_token_mask):
        loss = llm(inputs_embeds=embed(levels), attention_mask=attention_mask, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            out = llm.generate(inputs_embeds=embed(levels), attention_mask=attention_mask, max_new_tokens=4,
                               do_sample=False, pad_token_id=0)
    fusion.detach()
    params = sum(p.numel() for p in fusion.parameters())
    print(f"{name:<10} fused layers {list(fusion.fused_layers)}  {params:>7} fusion parameters  "
          f"loss {loss.item():.3f}  generated {out.tolist()}")
