"""Injection on every decoder-only family the issue names, built from tiny real transformers configs."""

from __future__ import annotations

import pytest
import torch

from internal_llm import left_padded_batch, levels_for
from layerfuse.internal import DeepStack, InternalDirect, InternalModular

transformers = pytest.importorskip("transformers")

COMMON = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 64, "pad_token_id": 0}
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "sliding_window": 8}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8, "sliding_window": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
}


def _same(actual, expected):
    # bit for bit; eager attention leaves NaN on fully padded rows of some families, equal on both sides
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def _llm(family: str):
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**COMMON, **extra)
    return getattr(transformers, model_name)(config).to(torch.float64).eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_attaches_injects_and_detaches(family):
    torch.manual_seed(0)
    llm = _llm(family)
    ids, attention_mask, mask = left_padded_batch()
    run = lambda: llm(input_ids=ids, attention_mask=attention_mask).logits  # noqa: E731
    with torch.no_grad():
        plain = run()
    fusions = [
        InternalDirect(16, 32, [0, 2], dtype=torch.float64),
        InternalModular(16, 32, [0, 2], num_heads=4, num_kv_heads=2, intermediate_size=64, dtype=torch.float64),
        DeepStack(16, 32, num_levels=2, projector="linear", dtype=torch.float64),
    ]
    levels = levels_for(mask, 2, dtype=torch.float64)
    for fusion in fusions:
        keys = list(llm.state_dict())
        fusion.attach(llm)
        assert list(llm.state_dict()) == keys
        with torch.no_grad():
            if not isinstance(fusion, InternalModular):  # zero projectors: nothing is added
                for p in fusion.parameters():
                    p.zero_()
            with fusion.inject(levels, mask):
                _same(run(), plain)  # corrected I_M: gates closed at initialisation
                for p in fusion.parameters():
                    p.copy_(torch.randn_like(p))
                fused = run()
                generated = llm.generate(input_ids=ids, attention_mask=attention_mask, max_new_tokens=2,
                                         do_sample=False, pad_token_id=0)
        assert not torch.allclose(fused, plain, equal_nan=True)
        assert generated.shape == (3, ids.shape[1] + 2)
        fusion.detach()
        with torch.no_grad():
            _same(run(), plain)
