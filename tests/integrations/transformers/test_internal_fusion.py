"""An internal fusion (I_D, I_M, DeepStack) inside a fused HF LLaVA model: forward, generate, save/load, training."""

import subprocess
import sys
import textwrap

import pytest
import torch

import hf_tiny
from hf_tiny import IMAGE, IMAGE_TOKEN, PAD
from layerfuse import LayerTap

transformers = pytest.importorskip("transformers")
integration = pytest.importorskip("layerfuse.integrations.transformers")
internal_pkg = pytest.importorskip("layerfuse.internal")
st = pytest.importorskip("safetensors.torch")

KINDS = ("direct", "deepstack", "modular")
VIT_LAYERS = {"direct": [1, 3], "deepstack": [2, 1], "modular": [-2]}


def internal_fusion(kind):
    if kind == "direct":
        return internal_pkg.InternalDirect(hf_tiny.DIM, hf_tiny.LLM, [0, 1])
    if kind == "deepstack":
        return internal_pkg.DeepStack(hf_tiny.DIM, hf_tiny.LLM, 2, projector="mlp2x_gelu")
    return internal_pkg.InternalModular(hf_tiny.DIM, hf_tiny.LLM, [1], num_heads=4, num_kv_heads=2,
                                        intermediate_size=64)


def fused(kind, family="concat", seed=0):
    torch.manual_seed(seed)
    module = hf_tiny.fusion_projector(family)
    internal = hf_tiny.perturb(internal_fusion(kind))
    model = integration.fuse_llava(hf_tiny.llava(), module, internal=internal, internal_layers=VIT_LAYERS[kind])
    return model, module, internal


def batch(seed=3):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": hf_tiny.prompt(16), "pixel_values": torch.randn(2, 3, IMAGE, IMAGE, generator=g)}


def greedy(model, inputs, new_tokens=4):
    ids = inputs["input_ids"]
    out = model.generate(**inputs, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=PAD, eos_token_id=None)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("kind", KINDS)
def test_the_model_injects_the_levels_of_its_own_tower_as_the_bare_fusion_does(kind):
    model, module, internal = fused(kind)
    inputs = batch()
    with torch.no_grad():
        got = model(**inputs).logits
        # reference: the stock LLaVA path with the bare fusion attached by hand (tests/internal's recipe)
        with LayerTap(model.model.vision_tower, [*module.layers, *VIT_LAYERS[kind]]) as tap:
            levels = tap(inputs["pixel_values"])
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        mask = inputs["input_ids"] == IMAGE_TOKEN
        tokens = module(levels[:len(module.layers)])
        embeds = embeds.masked_scatter(mask[..., None], tokens.reshape(-1, tokens.shape[-1]))
        internal.detach()
        internal.attach(model.model.language_model)
        with internal.inject(list(levels[len(module.layers):]), mask):
            hidden = model.model.language_model(inputs_embeds=embeds).last_hidden_state
        internal.detach()
        expected = model.lm_head(hidden)
        plain = integration.fuse_llava(hf_tiny.llava(), module)  # same module, no internal fusion
        plain.model.language_model.load_state_dict(model.model.language_model.state_dict())
        plain.model.vision_tower.load_state_dict(model.model.vision_tower.state_dict())
        plain.lm_head.load_state_dict(model.lm_head.state_dict())
        without = plain(**inputs).logits
    assert torch.equal(got, expected)
    assert not torch.allclose(got, without)  # the internal fusion did act


@pytest.mark.parametrize("kind", KINDS)
def test_generate_injects_at_prefill_and_matches_uncached_greedy_decoding(kind, monkeypatch):
    model, _, internal = fused(kind)
    inputs = batch()
    calls = []
    original = internal._project
    monkeypatch.setattr(internal, "_project", lambda level, features: calls.append(level) or original(level, features))
    with torch.no_grad():
        out = greedy(model, inputs)
        projected = len(calls)
        # without the KV cache every step recomputes the whole sequence, images included
        ids = inputs["input_ids"]
        for _ in range(out.shape[1]):
            logits = model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids[:, inputs["input_ids"].shape[1]:])
    # once per level at prefill; the cached decoding steps reuse it (I_M) or add nothing (I_D, DeepStack)
    assert projected == len(internal.fused_layers)
    assert internal._inputs is None  # nothing left over for a later call


def test_save_then_auto_class_load_in_a_fresh_process_gives_the_same_logits_and_generation(tmp_path):
    inputs = batch()
    torch.save(inputs, tmp_path / "inputs.pt")
    expected = {}
    for kind in KINDS:
        model, _, _ = fused(kind)
        model.save_pretrained(tmp_path / kind)
        with torch.no_grad():
            expected[kind] = (model(**inputs).logits, greedy(model, inputs))
    script = textwrap.dedent(f"""
        import torch
        import layerfuse
        from transformers import AutoModelForImageTextToText
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        out = {{}}
        for kind in {list(KINDS)!r}:
            model = AutoModelForImageTextToText.from_pretrained({str(tmp_path)!r} + "/" + kind).eval()
            assert type(model).__name__ == "LayerfuseLlavaForConditionalGeneration", type(model)
            assert type(model.model.internal_fusion).__name__ in {{"InternalDirect", "DeepStack", "InternalModular"}}
            ids = inputs["input_ids"]
            with torch.no_grad():
                generated = model.generate(**inputs, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                           do_sample=False, pad_token_id=0, eos_token_id=None)
                out[kind] = (model(**inputs).logits, generated[:, ids.shape[1]:])
        torch.save(out, {str(tmp_path / "out.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=300)
    got = torch.load(tmp_path / "out.pt")
    for kind in KINDS:
        assert torch.equal(got[kind][0], expected[kind][0]), kind
        assert torch.equal(got[kind][1], expected[kind][1]), kind


def test_config_stores_the_internal_fusion_and_its_vit_layers(tmp_path):
    model, _, internal = fused("deepstack")
    model.save_pretrained(tmp_path)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert config.internal_fusion == {"fusion": internal.fusion_config(), "layers": VIT_LAYERS["deepstack"]}
    assert model.model.internal_fusion is internal
    # the plain integration stores none
    assert integration.fuse_llava(hf_tiny.llava(), hf_tiny.fusion_projector("concat")).config.internal_fusion is None


def _rewrite(path, edit):
    weights = path / "model.safetensors"
    state = st.load_file(str(weights))
    edit(state)
    st.save_file(state, str(weights), metadata={"format": "pt"})


def test_missing_internal_fusion_weights_fail_loudly(tmp_path):
    fused("direct")[0].save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda s: s.pop("model.internal_fusion.projectors.1.2.weight"))
    with pytest.raises(ValueError, match=r"lacks or misshapes fusion .*internal_fusion\.projectors\.1\.2\.weight"):
        transformers.AutoModelForImageTextToText.from_pretrained(tmp_path)


def test_misshaped_internal_fusion_weights_fail_loudly(tmp_path):
    fused("deepstack")[0].save_pretrained(tmp_path)

    def shrink(state):
        key = "model.internal_fusion.mergers.0.0.weight"
        state[key] = state[key][:1]

    _rewrite(tmp_path, shrink)
    with pytest.raises((ValueError, RuntimeError), match="ignore_mismatched_sizes"):
        transformers.AutoModelForImageTextToText.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"lacks or misshapes fusion .*internal_fusion\.mergers\.0\.0\.weight"):
        transformers.AutoModelForImageTextToText.from_pretrained(tmp_path, ignore_mismatched_sizes=True)


def test_the_internal_fusion_is_a_fusion_module_for_the_training_helpers():
    model, module, internal = fused("modular")
    assert "internal_fusion" in integration.FUSION_MODULES
    expected = {id(p) for p in [*module.parameters(), *internal.parameters()]}
    assert {id(p) for p in integration.fusion_parameters(model)} == expected
    integration.set_training_stage(model, 1)
    assert {id(p) for p in model.parameters() if p.requires_grad} == expected
    integration.set_training_stage(model, 2)
    trainable = {n.split(".")[1] if n.startswith("model.") else n.split(".")[0]
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"language_model", "multi_modal_projector", "internal_fusion", "lm_head"}


def test_lora_never_wraps_the_internal_fusion_and_its_trained_copy_is_the_one_injected():
    peft = pytest.importorskip("peft")
    model, _, internal = fused("modular")
    inputs = batch()
    with torch.no_grad():
        before = model(**inputs).logits
    lora = peft.LoraConfig(r=2, target_modules=integration.llm_linear_names(model))
    wrapped = integration.set_training_stage(model, 2, lora=lora)
    lora_modules = [n for n, m in wrapped.named_modules() if hasattr(m, "lora_A")]
    assert lora_modules
    assert not any("internal_fusion" in n or "multi_modal_projector" in n for n in lora_modules)
    trained = {n for n, p in wrapped.named_parameters() if p.requires_grad and "internal_fusion" in n}
    assert trained
    assert all(".modules_to_save." in n for n in trained)
    with torch.no_grad():
        assert torch.equal(wrapped(**inputs).logits, before)  # LoRA starts at zero; one fusion injects
        copy = wrapped.get_submodule("base_model.model.model.internal_fusion.modules_to_save.default")
        for p in copy.parameters():
            p.add_(0.5)
        changed = wrapped(**inputs).logits
    assert copy.attached
    assert not internal.attached
    assert not torch.allclose(changed, before)


def test_fuse_llava_refuses_internal_fusions_that_do_not_fit():
    module = hf_tiny.fusion_projector("concat")
    direct = internal_pkg.InternalDirect(hf_tiny.DIM, hf_tiny.LLM, [0, 1])
    with pytest.raises(ValueError, match="internal and internal_layers go together"):
        integration.fuse_llava(hf_tiny.llava(), module, internal=direct)
    with pytest.raises(ValueError, match=r"internal_layers expected 2 ViT layers .*got \[1\]"):
        integration.fuse_llava(hf_tiny.llava(), module, internal=direct, internal_layers=[1])
    with pytest.raises(ValueError, match="lie outside the LLM"):
        integration.fuse_llava(hf_tiny.llava(), module, internal=internal_pkg.InternalDirect(
            hf_tiny.DIM, hf_tiny.LLM, [0, 5]), internal_layers=[1, 2])
    with pytest.raises(ValueError, match=r"internal\.in_dim is 8 but the vision tower's hidden size is 16"):
        integration.fuse_llava(hf_tiny.llava(), module, internal=internal_pkg.InternalDirect(
            8, hf_tiny.LLM, [0]), internal_layers=[1])
    with pytest.raises(TypeError, match=r"internal expected a layerfuse\.internal InternalFusion"):
        integration.fuse_llava(hf_tiny.llava(), module, internal=torch.nn.Linear(2, 2), internal_layers=[1])


def test_gradient_checkpointing_gives_the_same_loss_and_gradients_and_reaches_the_internal_fusion():
    results = []
    for checkpointing in (False, True):
        model, _, internal = fused("direct")
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        inputs = batch()
        labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN, -100)
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), [p.grad for p in internal.parameters()]))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss)
    assert all(g is not None for g in grads_ckpt)
    for g, g_ckpt in zip(grads, grads_ckpt):
        torch.testing.assert_close(g_ckpt, g)


def test_generate_with_several_sequences_per_prompt_is_refused_clearly():
    model, _, _ = fused("deepstack")
    inputs = batch()
    with pytest.raises(ValueError, match="num_return_sequences > 1 is not supported with an internal fusion"):
        model.generate(**inputs, max_new_tokens=2, do_sample=True, num_return_sequences=2, pad_token_id=PAD)


def test_a_deepstack_patch_merger_gets_its_levels_in_2x2_window_order():
    from layerfuse.features import LayerFeatures
    from layerfuse.integrations.transformers.internal import split_internal_levels

    grid, tokens = (4, 4), torch.randn(3, 2, 1 + 16, 8)  # 3 tapped layers, 2 images, CLS + 4 x 4 patches
    features = LayerFeatures(list(tokens), grid=grid, layers=[1, 2, 3])
    merger = internal_pkg.DeepStack(8, 32, 2)
    head, levels = split_internal_levels(features, 1, "cls_patch", 1, merger)
    assert head.layers == (1,)
    assert head.grid == grid
    assert torch.equal(head[0], tokens[0])
    for level, raw in zip(levels, tokens[1:]):
        assert torch.equal(level, internal_pkg.window_order(raw[:, 1:], grid))
    _, raster = split_internal_levels(features, 1, "cls_patch", 1, internal_pkg.DeepStack(8, 32, 2, projector="linear"))
    assert all(torch.equal(level, raw[:, 1:]) for level, raw in zip(raster, tokens[1:]))
