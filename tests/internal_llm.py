"""Tiny real HF decoder-only LLMs for the internal-fusion tests (no downloads)."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn


def tiny_llama(layers: int = 4, *, hidden: int = 32, heads: int = 4, kv_heads: int | None = None,
               vocab: int = 64, dtype: torch.dtype = torch.float32, attn: str = "sdpa", **extra) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads, vocab_size=vocab, max_position_embeddings=128,
        rms_norm_eps=1e-6, tie_word_embeddings=False, pad_token_id=0, **extra,
    )
    config._attn_implementation = attn
    return LlamaForCausalLM(config).to(dtype).eval()


def _rms_in_input_dtype(norm: nn.Module, x: Tensor) -> Tensor:
    # the fixtures carry the authors' float32 RMSNorm round trip in float64 (fixtures README §7.6)
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * y


def rmsnorm_in_input_dtype(llm: nn.Module) -> None:
    for module in llm.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = partial(_rms_in_input_dtype, module)


def state_digest(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


IMAGE_ID = 63


def left_padded_batch(dtype: torch.dtype = torch.float32, *, hidden: int = 32):
    """Three samples with 0, 1 and 2 images (4 and 4 + 6 image tokens), left-padded with id 0.

    Returns input_ids (3, L), attention_mask (3, L), image_token_mask (3, L).
    """
    image = [IMAGE_ID] * 4
    rows = [[1, 2, 3, 4, 5], [1, *image, 2, 3], [1, *image, 2, *([IMAGE_ID] * 6), 3]]
    length = max(map(len, rows))
    ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    return ids, attention_mask, ids == IMAGE_ID


def levels_for(mask: Tensor, count: int, width: int = 16, *, dtype: torch.dtype = torch.float32,
               per_token: int = 1) -> list[Tensor]:
    total = int(mask.sum()) * per_token
    return [torch.randn(total, width, dtype=dtype) for _ in range(count)]
