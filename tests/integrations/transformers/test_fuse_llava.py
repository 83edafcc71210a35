import pytest
import torch

import hf_tiny
from hf_tiny import FAMILIES, IMAGE, IMAGE_TOKEN, PAD, TEXT_DIM
from layerfuse import LayerTap

transformers = pytest.importorskip("transformers")
integration = pytest.importorskip("layerfuse.integrations.transformers")


def fused(family: str, tower: str = "clip"):
    module = hf_tiny.fusion_projector(family)
    return integration.fuse_llava(hf_tiny.llava(tower), module), module


def inputs(module, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, IMAGE, IMAGE, generator=g)
    extra = {}
    if integration.modeling.takes_instruction(module.get_config()):
        extra["instruction_embeds"] = torch.randn(batch, TEXT_DIM, generator=g)
    return pixel_values, extra


def reference_features(model, module, pixel_values, extra):
    with LayerTap(model.model.vision_tower, module.layers, tokens=module.tokens) as tap:
        features = tap(pixel_values)
    text = extra.get("instruction_embeds")
    return module(features) if text is None else module(features, text=text)


def reference_greedy(model, ids, features, new_tokens):
    """An independent LlamaForCausalLM with the fused model's LLM weights, fed the merged embeddings."""
    llm = transformers.LlamaForCausalLM(model.config.text_config).eval()
    state = {f"model.{k}": v for k, v in model.model.language_model.state_dict().items()}
    state["lm_head.weight"] = model.lm_head.weight
    llm.load_state_dict(state)
    embeds = llm.get_input_embeddings()(ids)
    embeds = embeds.masked_scatter((ids == IMAGE_TOKEN)[..., None], features.reshape(-1, features.shape[-1]))
    out = llm.generate(
        inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
        pad_token_id=PAD, eos_token_id=None,
    )
    return out[:, -new_tokens:]


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_features_equal_the_layerfuse_pipeline_and_greedy_generate_equals_llama(family):
    model, module = fused(family)
    pixel_values, extra = inputs(module)
    with torch.no_grad():
        expected = reference_features(model, module, pixel_values, extra)
        got = model.get_image_features(pixel_values=pixel_values, **extra).pooler_output
        assert torch.equal(torch.stack(got), expected)
        ids = hf_tiny.prompt(expected.shape[1])
        out = model.generate(
            input_ids=ids, pixel_values=pixel_values, attention_mask=torch.ones_like(ids), max_new_tokens=4,
            do_sample=False, pad_token_id=PAD, eos_token_id=None, **extra,
        )
        assert torch.equal(out[:, ids.shape[1]:], reference_greedy(model, ids, expected, 4))


def test_forward_with_labels_gives_the_lm_loss_and_backward_reaches_the_fuser():
    model, module = fused("mmfuser")
    model.train()
    pixel_values, _ = inputs(module)
    ids = hf_tiny.prompt(16)
    labels = ids.masked_fill(ids == IMAGE_TOKEN, -100)
    out = model(input_ids=ids, pixel_values=pixel_values, labels=labels)
    manual = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, manual)
    out.loss.backward()
    assert all(p.grad is not None for p in module.parameters())


def test_generate_runs_the_fusion_once_at_prefill_with_the_kv_cache():
    model, module = fused("cross_attention")
    calls = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    pixel_values, _ = inputs(module)
    ids = hf_tiny.prompt(16)
    with torch.no_grad():
        model.generate(input_ids=ids, pixel_values=pixel_values, max_new_tokens=5, do_sample=False,
                       pad_token_id=PAD, eos_token_id=None)
        assert len(calls) == 1
        torch.manual_seed(0)
        sampled = model.generate(input_ids=ids, pixel_values=pixel_values, max_new_tokens=5, do_sample=True,
                                 top_k=5, pad_token_id=PAD, eos_token_id=None)
    handle.remove()
    assert len(calls) == 2
    assert sampled.shape == (2, ids.shape[1] + 5)


def test_batched_left_padded_generate_equals_each_prompt_alone():
    model, module = fused("igva")
    pixel_values, extra = inputs(module)
    short, long = hf_tiny.prompt(16, batch=1, before=1, seed=1), hf_tiny.prompt(16, batch=1, before=4, seed=2)
    pad = long.shape[1] - short.shape[1]
    ids = torch.cat([torch.cat([torch.full((1, pad), PAD), short], dim=1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(short)], dim=1),
                      torch.ones_like(long)])
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": PAD, "eos_token_id": None}
    with torch.no_grad():
        batched = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, **extra, **kwargs)
        for row, prompt_ids in enumerate((short, long)):
            alone = model.generate(
                input_ids=prompt_ids, pixel_values=pixel_values[row:row + 1],
                instruction_embeds=extra["instruction_embeds"][row:row + 1], **kwargs,
            )
            assert torch.equal(batched[row, -5:], alone[0, -5:])


def test_instruction_embeds_are_required_by_igva_and_refused_by_other_fusers():
    model, module = fused("igva")
    pixel_values, extra = inputs(module)
    ids = hf_tiny.prompt(16)
    with pytest.raises(ValueError, match="needs instruction_embeds"):
        model(input_ids=ids, pixel_values=pixel_values)
    with pytest.raises(ValueError, match="without pixel_values"):
        model(input_ids=ids, instruction_embeds=extra["instruction_embeds"])
    other, _ = fused("concat")
    with pytest.raises(ValueError, match="only used by a gated InstructionGatedFuser"):
        other(input_ids=ids, pixel_values=pixel_values, instruction_embeds=extra["instruction_embeds"])


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model, module = fused("mmfuser")
    model.train()
    pixel_values, _ = inputs(module)
    ids = hf_tiny.prompt(16)
    labels = ids.masked_fill(ids == IMAGE_TOKEN, -100)

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=ids, pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain_loss, plain_grads = loss_and_grads()
    model.gradient_checkpointing_enable()  # transformers default: non-reentrant checkpoints
    for part in (model.model.language_model, model.model.vision_tower):
        assert any(getattr(m, "gradient_checkpointing", False) for m in part.modules())
    ckpt_loss, ckpt_grads = loss_and_grads()
    torch.testing.assert_close(ckpt_loss, plain_loss)
    assert len(ckpt_grads) == len(plain_grads)
    for a, b in zip(ckpt_grads, plain_grads):
        torch.testing.assert_close(a, b)


def test_fuse_llava_refuses_what_does_not_fit():
    with pytest.raises(TypeError, match="model expected one of"):
        integration.fuse_llava(torch.nn.Linear(2, 2), hf_tiny.fusion_projector("concat"))
    with pytest.raises(TypeError, match="module expected a layerfuse FusionProjector"):
        integration.fuse_llava(hf_tiny.llava(), torch.nn.Linear(2, 2))
    wide = hf_tiny.fusion_projector("concat")
    wide.projector = hf_tiny.Projector("mlp2x_gelu", wide.fuser.out_dim, 40)
    with pytest.raises(ValueError, match="the LLM's hidden size is 32"):
        integration.fuse_llava(hf_tiny.llava(), wide)
    deep = hf_tiny.FusionProjector(
        hf_tiny.ConcatFuser([16, 16]), hf_tiny.Projector("mlp2x_gelu", 32, 32), layers=[1, 9]
    )
    with pytest.raises(ValueError, match="layer index 9 is out of range"):
        integration.fuse_llava(hf_tiny.llava(), deep)


def test_siglip_tower_without_cls():
    model, module = fused("mmfuser", tower="siglip")
    pixel_values, extra = inputs(module)
    with torch.no_grad():
        got = torch.stack(model.get_image_features(pixel_values=pixel_values).pooler_output)
        assert torch.equal(got, reference_features(model, module, pixel_values, extra))
    assert got.shape[1] == 16


def test_fusing_a_fused_model_replaces_its_fusion_projector():
    first, _ = fused("concat")
    module = hf_tiny.fusion_projector("weighted_sum")
    again = integration.fuse_llava(first, module)
    assert again.model.multi_modal_projector is module
    assert again.config.fusion == module.get_config()
    assert again.model.language_model is first.model.language_model
