"""Attaching, injecting and detaching on real tiny HF LLMs: positions, prefill only, identities, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from internal_llm import IMAGE_ID, left_padded_batch, levels_for, state_digest, tiny_llama
from layerfuse.internal import (
    DeepStack,
    InternalDirect,
    InternalFusion,
    InternalModular,
    find_decoder_layers,
    lin_layer_map,
)

pytest.importorskip("transformers")


def _fusions(dtype=torch.float32, hidden=32, heads=4, kv_heads=None, layers=(0, 2)):
    return {
        "direct": InternalDirect(16, hidden, list(layers), dtype=dtype),
        "modular": InternalModular(16, hidden, list(layers), num_heads=heads, num_kv_heads=kv_heads,
                                   intermediate_size=2 * hidden, dtype=dtype),
        "deepstack": DeepStack(16, hidden, num_levels=len(layers), projector="mlp2x_gelu", dtype=dtype),
    }


def _open(fusion: InternalFusion) -> None:
    """Random non-zero fusion parameters (gates open) so that every branch contributes."""
    with torch.no_grad():
        for p in fusion.parameters():
            p.copy_(torch.randn_like(p) * 0.5)


@pytest.mark.parametrize("kind", ["direct", "modular", "deepstack"])
def test_attach_keeps_llm_keys_and_detach_restores_bit_for_bit(kind):
    llm = tiny_llama()
    ids, attention_mask, mask = left_padded_batch()
    before = state_digest(llm)
    with torch.no_grad():
        expected = llm(input_ids=ids, attention_mask=attention_mask).logits
    fusion = _fusions()[kind]
    _open(fusion)
    fusion.attach(llm)
    assert list(llm.state_dict()) == list(before)
    llm_params = {id(p) for p in llm.parameters()}
    assert not any(id(p) in llm_params for p in fusion.parameters())
    assert not any(k.startswith(("model.", "lm_head")) for k in fusion.state_dict())
    with torch.no_grad():
        assert torch.equal(llm(input_ids=ids, attention_mask=attention_mask).logits, expected)  # no features held
        with fusion.inject(levels_for(mask, 2), mask):
            changed = llm(input_ids=ids, attention_mask=attention_mask).logits
    assert not torch.equal(changed, expected)
    fusion.detach()
    with torch.no_grad():
        assert torch.equal(llm(input_ids=ids, attention_mask=attention_mask).logits, expected)
    assert all(torch.equal(v, before[k]) for k, v in llm.state_dict().items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in llm.modules())


@pytest.mark.parametrize("kind", ["direct", "modular", "deepstack"])
def test_identity_cases_leave_logits_unchanged_exactly(kind):
    """I_D / DeepStack with zeroed projectors, corrected I_M at its initial (closed) gates."""
    llm = tiny_llama(kv_heads=2)  # GQA
    ids, attention_mask, mask = left_padded_batch()
    with torch.no_grad():
        expected = llm(input_ids=ids, attention_mask=attention_mask).logits
    fusion = _fusions(kv_heads=2)[kind]
    if kind != "modular":
        with torch.no_grad():
            for p in fusion.parameters():
                p.zero_()
    levels = levels_for(mask, 2)
    fusion.attach(llm)
    with torch.no_grad(), fusion.inject(levels, mask):
        assert torch.equal(llm(input_ids=ids, attention_mask=attention_mask).logits, expected)
        assert torch.equal(llm(input_ids=ids, attention_mask=attention_mask).logits, expected)


def test_authors_mode_is_not_an_identity_at_closed_gates():
    llm = tiny_llama()
    ids, attention_mask, _ = left_padded_batch()
    ids, attention_mask = ids[1:2, -7:], attention_mask[1:2, -7:]  # one sample, one image, no padding
    mask = ids == IMAGE_ID
    fusion = InternalModular(16, 32, [1], num_heads=4, intermediate_size=64, mode="authors").attach(llm)
    with torch.no_grad():
        with fusion.inject(levels_for(mask, 1), mask):
            authors = llm(input_ids=ids).logits
        fusion.detach()
        plain = llm(input_ids=ids).logits
    assert not torch.allclose(authors, plain)  # the post-norm residual of the authors' layer (specs §3.6)


@pytest.mark.parametrize("kind", ["direct", "deepstack"])
def test_features_land_on_the_image_tokens_of_a_left_padded_batch(kind):
    """Samples with 0, 1 and 2 images (different lengths), left padding: the difference a fused layer
    makes is the projected level on the image tokens and exactly 0 everywhere else."""
    llm = tiny_llama(dtype=torch.float64)
    ids, attention_mask, mask = left_padded_batch()
    fusion = _fusions(torch.float64)[kind]
    _open(fusion)
    levels = levels_for(mask, 2, dtype=torch.float64)
    layers = llm.model.layers
    seen: dict[str, torch.Tensor] = {}
    fusion.attach(llm)
    for j in (0, 1, 2):  # registered after attach: these hooks see what the fusion produced
        layers[j].register_forward_pre_hook(lambda m, a, kw, j=j: seen.__setitem__(f"in{j}", a[0]), with_kwargs=True)
        layers[j].register_forward_hook(lambda m, a, out, j=j: seen.__setitem__(f"out{j}", out))
    llm.model.embed_tokens.register_forward_hook(lambda m, a, out: seen.__setitem__("embeds", out))
    with torch.no_grad(), fusion.inject(levels, mask):
        llm(input_ids=ids, attention_mask=attention_mask)
    if kind == "direct":  # added before layers 0 and 2: compare each fused input with what preceded it
        pairs = [(seen["embeds"], seen["in0"], 0), (seen["out1"], seen["in2"], 1)]
    else:  # added after layers 0 and 1: compare each fused output with the layer run without the fusion
        with torch.no_grad():
            kwargs = _layer_kwargs(llm, ids, attention_mask)
            pairs = [(type(layers[j]).forward(layers[j], seen[f"in{j}"], **kwargs), seen[f"out{j}"], j) for j in (0, 1)]
    for before, after, level in pairs:
        diff = after - before
        assert torch.equal(diff[~mask], torch.zeros_like(diff[~mask]))
        with torch.no_grad():
            torch.testing.assert_close(diff[mask], fusion._project(level, levels[level]), rtol=1e-12, atol=1e-12)


def _layer_kwargs(llm, ids, attention_mask):
    """The keyword arguments LlamaModel gives its decoder layers (transformers 5)."""
    from transformers.masking_utils import create_causal_mask

    embeds = llm.model.embed_tokens(ids)
    position_ids = torch.arange(ids.shape[1])[None]
    causal = create_causal_mask(config=llm.config, inputs_embeds=embeds, attention_mask=attention_mask,
                                cache=None, position_ids=position_ids)
    return {"attention_mask": causal, "position_ids": position_ids,
            "position_embeddings": llm.model.rotary_emb(embeds, position_ids=position_ids)}


def _count_calls(modules) -> list[int]:
    counts = [0]

    def hook(module, args, out):
        counts[0] += 1

    for module in modules:
        module.register_forward_hook(hook)
    return counts


@pytest.mark.parametrize("kind", ["direct", "modular", "deepstack"])
@pytest.mark.parametrize("do_sample", [False, True])
def test_generate_injects_at_prefill_only_and_matches_uncached(kind, do_sample):
    llm = tiny_llama(dtype=torch.float64)
    ids, attention_mask, mask = left_padded_batch()
    fusion = _fusions(torch.float64)[kind]
    _open(fusion)
    levels = levels_for(mask, 2, dtype=torch.float64)
    fusion.attach(llm)
    projectors = fusion.mergers if kind == "deepstack" else fusion.projectors
    calls = _count_calls(projectors)
    prefill_calls = []
    llm.model.register_forward_pre_hook(lambda m, a, kw: prefill_calls.append(calls[0]), with_kwargs=True)
    settings = {"max_new_tokens": 4, "do_sample": do_sample, "pad_token_id": 0}
    with torch.no_grad(), fusion.inject(levels, mask):
        torch.manual_seed(1)
        cached = llm.generate(input_ids=ids, attention_mask=attention_mask, use_cache=True, **settings)
        # every projector ran once, in the prefill; the decoding steps reuse (I_M) or skip them
        assert calls[0] == 2
        assert prefill_calls[:2] == [0, 2]
        torch.manual_seed(1)
        uncached = llm.generate(input_ids=ids, attention_mask=attention_mask, use_cache=False, **settings)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("kind", ["direct", "modular", "deepstack", "modular_authors"])
def test_gradient_checkpointing_injects_once_and_keeps_gradients(kind, reentrant):
    ids, attention_mask, mask = left_padded_batch()
    if kind == "modular_authors":  # one image block per sample, as the authors' code needs
        ids, attention_mask, mask = ids[1:2], attention_mask[1:2], mask[1:2]
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        llm = tiny_llama(dtype=torch.float64).train()
        if kind == "modular_authors":
            fusion = InternalModular(16, 32, [0, 2], num_heads=4, intermediate_size=64, mode="authors",
                                     dtype=torch.float64)
        else:
            fusion = _fusions(torch.float64)[kind]
        _open(fusion)
        levels = [t.requires_grad_(True) for t in levels_for(mask, 2, dtype=torch.float64)]
        if checkpointing:
            llm.activation_checkpointing_enable({"use_reentrant": reentrant})
        fusion.attach(llm)
        projectors = fusion.mergers if kind == "deepstack" else fusion.projectors
        calls = _count_calls(projectors)
        with fusion.inject(levels, mask):
            out = llm(input_ids=ids, attention_mask=attention_mask, labels=ids)
            out.loss.backward()
        grads = [p.grad.clone() for p in fusion.parameters()] + [t.grad.clone() for t in levels]
        results.append((out.loss.detach(), grads, calls[0]))
    (loss, grads, calls), (loss_ckpt, grads_ckpt, calls_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-12, atol=0)
    for g, g_ckpt in zip(grads, grads_ckpt):
        torch.testing.assert_close(g_ckpt, g, rtol=1e-10, atol=1e-12)
    assert calls == 2
    # hooks on the decoder layer run outside transformers' checkpoint, so the projection is never
    # recomputed; the authors' mode hooks inside the layer and recomputes it with the same inputs
    assert calls_ckpt == (4 if kind == "modular_authors" else 2)


def test_bad_inputs_give_clear_errors():
    llm = tiny_llama()
    ids, attention_mask, mask = left_padded_batch()
    fusion = InternalDirect(16, 32, [0, 2]).attach(llm)
    with pytest.raises(ValueError, match=r"features\[1\] has 13 tokens, expected 14 .*per sample \[0, 4, 10\]"):
        fusion.set_inputs([torch.randn(14, 16), torch.randn(13, 16)], mask)
    with pytest.raises(TypeError, match=r"features\[0\] expected a floating-point tensor, got dtype torch.int64"):
        fusion.set_inputs([torch.zeros(14, 16, dtype=torch.long), torch.randn(14, 16)], mask)
    with pytest.raises(TypeError, match=r"features\[1\] has dtype torch.float64 but the module's parameters are"):
        fusion.set_inputs([torch.randn(14, 16), torch.randn(14, 16, dtype=torch.float64)], mask)
    with pytest.raises(ValueError, match="expected 2 levels"):
        fusion.set_inputs([torch.randn(14, 16)], mask)
    with pytest.raises(TypeError, match=r"image_token_mask expected dtype torch\.bool"):
        fusion.set_inputs(levels_for(mask, 2), mask.long())
    with (pytest.raises(ValueError, match=r"called with batch 2, .* for batch 3"), fusion.inject(levels_for(mask, 2), mask)):
        llm(input_ids=ids[:2])
    with (pytest.raises(ValueError, match="covers 13 positions, but the LLM's prefill sequence has 5"),
          fusion.inject(levels_for(mask, 2), mask)):
        llm(input_ids=ids[:, :5])
    with pytest.raises(RuntimeError, match="already attached"):
        fusion.attach(llm)
    fusion.detach()
    with pytest.raises(ValueError, match=r"lie outside the LLM: it has 4 decoder layers \(0..3\), got layer\(s\) \[5\]"):
        InternalDirect(16, 32, [0, 5]).attach(llm)
    with pytest.raises(ValueError, match="could not find the decoder layers of Linear"):
        InternalDirect(16, 32, [0]).attach(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="could not find the decoder layers"):
        find_decoder_layers(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="ViT layers map outside the LLM's 8 decoder layers"):
        lin_layer_map([0], 8)
    with pytest.raises(ValueError, match="'former' fuses 12 decoder layers, the LLM has 8"):
        lin_layer_map("former", 8)
    authors = InternalModular(16, 32, [1], num_heads=4, intermediate_size=64, mode="authors").attach(llm)
    with (pytest.raises(ValueError, match="every sample needs the same number of image tokens"), torch.no_grad(),
          authors.inject(levels_for(mask, 1), mask)):
        llm(input_ids=ids, attention_mask=attention_mask)
    with pytest.raises(ValueError, match="mode expected one of 'corrected', 'authors'"):
        InternalModular(16, 32, [1], num_heads=4, intermediate_size=64, mode="fixed")


def test_lin_layer_map_truncates_toward_zero_like_the_authors():
    assert lin_layer_map("3-18-23", 8) == (0, 5, 6)
    assert lin_layer_map("3-18-23", 24) == (2, 17, 22)
    assert lin_layer_map("3-18-23", 32) == (3, 23, 29)
    assert lin_layer_map("3-18", 4) == (0, 2)  # int(3*4/24 - 1) = int(-0.5) = 0
    assert lin_layer_map("latter", 32) == tuple(range(20, 32))
    assert lin_layer_map("all", 32) == (*range(12), *range(20, 32))


def test_importing_layerfuse_internal_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, layerfuse.internal, layerfuse.convert.lin_internal; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("kind", ["direct", "modular", "deepstack"])
def test_each_sample_sees_only_its_own_images(kind):
    """Changing the features of sample 2's images changes sample 2 only; sample 0 (no image) is the
    plain LLM's output exactly."""
    llm = tiny_llama(dtype=torch.float64)
    ids, attention_mask, mask = left_padded_batch()
    fusion = _fusions(torch.float64)[kind]
    _open(fusion)
    levels = levels_for(mask, 2, dtype=torch.float64)
    changed = [level.clone() for level in levels]
    for level in changed:
        level[4:] += 1.0  # rows 0..3 are sample 1's image, rows 4..13 sample 2's two images
    with torch.no_grad():
        plain = llm(input_ids=ids, attention_mask=attention_mask).logits
        fusion.attach(llm)
        with fusion.inject(levels, mask):
            first = llm(input_ids=ids, attention_mask=attention_mask).logits
        with fusion.inject(changed, mask):
            second = llm(input_ids=ids, attention_mask=attention_mask).logits
    assert torch.equal(first[0], plain[0])
    assert torch.equal(second[0], plain[0])
    assert torch.equal(first[1], second[1])
    assert not torch.allclose(first[2], second[2])
