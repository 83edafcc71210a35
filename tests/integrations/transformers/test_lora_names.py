"""No LoRA recipe reaches into a fusion projector, whatever the LLM family."""

import pytest
from torch import nn

import hf_tiny
from hf_tiny import FAMILIES, IMAGE_TOKEN

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
integration = pytest.importorskip("layerfuse.integrations.transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

_COMMON = {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
# tiny configs of the LLM families LLaVA-style models are built on
LLM_CONFIGS = {
    "llama": ("LlamaConfig", {**_COMMON, "intermediate_size": 32, "num_key_value_heads": 2}),
    "mistral": ("MistralConfig", {**_COMMON, "intermediate_size": 32, "num_key_value_heads": 2}),
    "qwen2": ("Qwen2Config", {**_COMMON, "intermediate_size": 32, "num_key_value_heads": 2}),
    "qwen3": ("Qwen3Config", {**_COMMON, "intermediate_size": 32, "num_key_value_heads": 2, "head_dim": 8}),
    "gemma": ("GemmaConfig", {**_COMMON, "intermediate_size": 32, "num_key_value_heads": 2, "head_dim": 8}),
    "gemma2": ("Gemma2Config", {**_COMMON, "intermediate_size": 32, "num_key_value_heads": 2, "head_dim": 8}),
    "gemma3": ("Gemma3TextConfig", {**_COMMON, "intermediate_size": 32, "num_key_value_heads": 2, "head_dim": 8}),
    "phi": ("PhiConfig", {**_COMMON, "intermediate_size": 32}),
    "phi3": ("Phi3Config", {**_COMMON, "intermediate_size": 32, "pad_token_id": 0}),
    "opt": ("OPTConfig", {**_COMMON, "ffn_dim": 32, "word_embed_proj_dim": 16}),
    "mpt": ("MptConfig", {"vocab_size": 64, "d_model": 16, "n_layers": 1, "n_heads": 2}),
    "gpt_neox": ("GPTNeoXConfig", {**_COMMON, "intermediate_size": 32}),
    "falcon": ("FalconConfig", _COMMON),
    "gpt2": ("GPT2Config", {"vocab_size": 64, "n_embd": 16, "n_layer": 1, "n_head": 2}),
}


def linear_leaf_names(model: nn.Module, skip: tuple[str, ...] = ()) -> set[str]:
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | Conv1D) and not any(s in name for s in skip)
    }


@pytest.fixture(scope="module")
def llm_names():
    names = {}
    for family, (config_name, kwargs) in LLM_CONFIGS.items():
        llm = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_name)(**kwargs))
        names[family] = linear_leaf_names(llm) - {"lm_head"}
    return names


@pytest.mark.parametrize("fusion", FAMILIES)
def test_no_fuser_leaf_module_shares_a_name_with_an_llm_linear_layer(fusion, llm_names):
    """PEFT matches a target name list as suffixes of every module path, fusion projector included."""
    leaves = linear_leaf_names(hf_tiny.fusion_projector(fusion))
    for family, names in llm_names.items():
        assert not leaves & names, f"{fusion} leaf modules {sorted(leaves & names)} collide with {family}"


def test_the_llm_families_cover_the_names_that_collided_before(llm_names):
    assert {"fc1", "fc2"} <= llm_names["phi"] & llm_names["opt"]
    assert "out_proj" in llm_names["opt"] & llm_names["mpt"]


def opt_llava():
    vision, _ = hf_tiny.configs()
    text = transformers.OPTConfig(
        vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
        pad_token_id=0, tie_word_embeddings=False,
    )
    # OPT keeps its embeddings under decoder., so LLaVA's embed_tokens/lm_head tie does not apply
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, tie_word_embeddings=False
    )
    return transformers.LlavaForConditionalGeneration(config)


def lora_wrapped(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


@pytest.mark.parametrize("fusion", ["cross_attention", "igva"])
def test_llava_find_all_linear_names_recipe_never_wraps_a_fusion_module(fusion):
    """OPT's fc1/fc2/out_proj used to reach CrossAttentionFuser's MLP and IGVA's gate attention."""
    model = integration.fuse_llava(opt_llava(), hf_tiny.fusion_projector(fusion))
    names = integration.llm_linear_names(model)
    assert {"fc1", "fc2", "out_proj", "q_proj"} <= set(names)
    wrapped = lora_wrapped(peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=names)))
    assert wrapped
    assert not any("multi_modal_projector" in n for n in wrapped)


def test_all_linear_with_the_exported_fusion_modules_never_wraps_a_fusion_module():
    model = integration.fuse_llava(opt_llava(), hf_tiny.fusion_projector("cross_attention"))
    config = peft.LoraConfig(r=2, target_modules="all-linear", modules_to_save=list(integration.FUSION_MODULES))
    wrapped_model = peft.get_peft_model(model, config)
    wrapped = lora_wrapped(wrapped_model)
    assert wrapped
    assert not any("multi_modal_projector" in n for n in wrapped)
    trained = {n for n, p in wrapped_model.named_parameters() if p.requires_grad and "multi_modal_projector" in n}
    assert trained
    assert all(".modules_to_save.default." in n for n in trained)
    # the adapter checkpoint carries the fusion weights
    state = peft.get_peft_model_state_dict(wrapped_model)
    assert any("multi_modal_projector" in k for k in state)
    # the parameters to give their own learning rate are the trained copy's
    fusion = {id(p) for p in integration.fusion_parameters(wrapped_model)}
    assert fusion == {id(p) for n, p in wrapped_model.named_parameters() if n in trained}
