"""Internal fusion under autocast, torch.compile, PEFT LoRA, and saving/loading."""

from __future__ import annotations

import json

import pytest
import torch

from internal_llm import left_padded_batch, levels_for, tiny_llama
from layerfuse.internal import DeepStack, InternalDirect, InternalFusion, InternalModular

pytest.importorskip("transformers")


def _all(dtype=torch.float32):
    return [
        InternalDirect(16, 32, [0, 2], input_projector="mlp2x_gelu", dtype=dtype),
        InternalModular(16, 32, [1, 3], num_heads=4, num_kv_heads=2, intermediate_size=64, dtype=dtype),
        InternalModular(16, 32, [1], num_heads=4, intermediate_size=64, mode="authors", dtype=dtype),
        DeepStack(16, 32, num_levels=2, dtype=dtype),
    ]


def _levels(fusion, mask, dtype=torch.float32):
    per_token = 4 if isinstance(fusion, DeepStack) else 1
    return levels_for(mask, len(fusion.fused_layers), dtype=dtype, per_token=per_token)


def _one_image_per_sample():
    ids, attention_mask, mask = left_padded_batch()
    return ids[1:2], attention_mask[1:2], mask[1:2]


def _open(fusion):
    with torch.no_grad():
        for p in fusion.parameters():
            p.copy_(torch.randn_like(p) * 0.3)


@pytest.mark.parametrize("index", range(4))
def test_save_and_load_round_trip(tmp_path, index):
    fusion = _all()[index]
    _open(fusion)
    fusion.save_pretrained(tmp_path)
    loaded = InternalFusion.from_pretrained(tmp_path)
    assert type(loaded) is type(fusion)
    assert loaded.get_config() == fusion.get_config()
    assert loaded.fused_layers == fusion.fused_layers
    state = fusion.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    # what a host model's config stores: JSON, rebuilt with fresh parameters of the same shapes
    rebuilt = InternalFusion.from_fusion_config(json.loads(json.dumps(fusion.fusion_config())))
    assert type(rebuilt) is type(fusion)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in state.items()}


def test_from_fusion_config_refuses_other_classes():
    with pytest.raises(ValueError, match="saved expected"):
        InternalFusion.from_fusion_config({"class": "ConcatFuser", "config": {}})


@pytest.mark.parametrize("index", range(4))
def test_bf16_autocast_training_step(index):
    llm = tiny_llama(kv_heads=2).train()
    fusion = _all()[index]
    _open(fusion)
    ids, attention_mask, mask = _one_image_per_sample() if index == 2 else left_padded_batch()
    levels = _levels(fusion, mask)
    fusion.attach(llm)
    with fusion.inject(levels, mask):
        reference = llm(input_ids=ids, attention_mask=attention_mask).logits.detach()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = llm(input_ids=ids, attention_mask=attention_mask, labels=ids)
        out.loss.backward()
    real = attention_mask.bool()
    torch.testing.assert_close(out.logits.float()[real], reference[real], rtol=0.1, atol=0.1)
    grads = [p.grad for p in fusion.parameters() if p.grad is not None]
    assert grads
    assert all(g.dtype == torch.float32 and g.isfinite().all() for g in grads)


def test_bf16_model_and_fusion():
    llm = tiny_llama(dtype=torch.bfloat16)
    fusion = InternalDirect(16, 32, [0, 2], dtype=torch.bfloat16).attach(llm)
    ids, attention_mask, mask = left_padded_batch()
    with torch.no_grad(), fusion.inject(_levels(fusion, mask, torch.bfloat16), mask):
        logits = llm(input_ids=ids, attention_mask=attention_mask).logits
    assert logits.dtype == torch.bfloat16


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1])
def test_torch_compile_of_the_llm(index):
    llm = tiny_llama()
    fusion = _all()[index]
    _open(fusion)
    ids, attention_mask, mask = left_padded_batch()
    levels = _levels(fusion, mask)
    fusion.attach(llm)
    compiled = torch.compile(llm, backend="aot_eager")
    with torch.no_grad(), fusion.inject(levels, mask):
        expected = llm(input_ids=ids, attention_mask=attention_mask).logits
        actual = compiled(input_ids=ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        plain = llm(input_ids=ids, attention_mask=attention_mask).logits
    assert not torch.allclose(plain, expected)


@pytest.mark.parametrize("attach_first", [False, True])
def test_peft_lora_all_linear_leaves_the_fusion_alone(attach_first):
    peft = pytest.importorskip("peft")
    llm = tiny_llama().train()
    fusion = InternalModular(16, 32, [1], num_heads=4, intermediate_size=64)
    _open(fusion)
    if attach_first:
        fusion.attach(llm)
    model = peft.get_peft_model(llm, peft.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    if not attach_first:
        fusion.attach(model)
    wrapped = {name for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert wrapped
    assert all(".layers." in name for name in wrapped)
    assert not any(hasattr(m, "lora_A") for m in fusion.modules())
    ids, attention_mask, mask = left_padded_batch()
    with fusion.inject(_levels(fusion, mask), mask):
        model(input_ids=ids, attention_mask=attention_mask, labels=ids).loss.backward()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert all(p.grad is not None for p in lora)
    assert all(p.grad is not None for p in fusion.parameters())
    fusion.detach()
