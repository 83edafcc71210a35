"""Lin et al.'s I_D and I_M against the authors' whole model run in float64 (fixtures README §7)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from fixture_utils import assert_fixture_close, load_fixture
from internal_llm import rmsnorm_in_input_dtype
from layerfuse import from_official
from layerfuse.internal import InternalDirect, InternalModular

pytest.importorskip("transformers")


def _llm(fx):
    from transformers import LlamaConfig, LlamaForCausalLM

    c = fx.config
    config = LlamaConfig(
        hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"], num_key_value_heads=c["num_key_value_heads"],
        vocab_size=c["output"] if "output" in c else fx["output"].shape[-1], rms_norm_eps=c["rms_norm_eps"],
        rope_theta=c.get("rope_theta", 10000.0), max_position_embeddings=c["max_position_embeddings"],
        attention_bias=False, tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    llm = LlamaForCausalLM(config).to(torch.float64).eval()
    checkpoint = fx.checkpoint()
    llm_state = {k: v for k, v in checkpoint.items() if "mm_projector" not in k and "ucross_" not in k}
    missing, unexpected = llm.load_state_dict(llm_state, strict=False)
    assert not unexpected
    assert all("rotary" in k for k in missing)
    rmsnorm_in_input_dtype(llm)
    return llm


def _run(fx, fusion, vit_layers):
    llm = _llm(fx)
    fusion.attach(llm)
    vit = {k: fx[f"input.vit.{k}"].clone().requires_grad_(True) for k in set(vit_layers) | {23}}
    mask = fx["image_token_mask"].bool()
    index = mask.nonzero(as_tuple=True)
    tokens = fusion.input_projector(vit[23])
    embeds = fx["inputs_embeds"].index_put(index, tokens.reshape(-1, tokens.shape[-1]))
    levels = [vit[k] for k in vit_layers]
    with fusion.inject(levels, mask):
        logits = llm(inputs_embeds=embeds, attention_mask=fx["attention_mask_spliced"]).logits
    labels = fx["labels_spliced"]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert_fixture_close(logits, fx["output"], name="output")
    assert_fixture_close(loss, fx["loss"], name="loss")
    (loss + (logits * fx["upstream"]).sum()).backward()
    params = dict(fusion.named_parameters())
    checkpoint_names = _official_names(fx, fusion)
    for name, official in checkpoint_names.items():
        assert_fixture_close(params[name].grad, fx[f"grad.param.{official}"], name=f"grad {official}")
    for k, tensor in vit.items():
        assert_fixture_close(tensor.grad, fx[f"grad.input.vit.{k}"], name=f"grad vit.{k}")
    fusion.detach()
    return llm


def _official_names(fx, fusion):
    """layerfuse parameter name -> the authors' key, for every gradient the fixture stores."""
    names = {}
    fused = list(fusion.fused_layers)
    ucross = {"attn.": "ucross_attn.", "mlp.": "ucross_mlp.", "attn_gate.": "ucross_xattn.", "mlp_gate.": "ucross_xmlp."}
    for name, _ in fusion.named_parameters():
        if name.startswith("projectors."):
            names[name] = "model.mm_projectors." + name[len("projectors."):]
        elif name.startswith("input_projector."):
            names[name] = "model.mm_projector_f." + name[len("input_projector."):]
        else:
            _, level, rest = name.split(".", 2)
            prefix = next(p for p in ucross if rest.startswith(p))
            names[name] = f"model.layers.{fused[int(level)]}.{ucross[prefix]}{rest[len(prefix):]}"
    stored = {k[len("grad.param."):] for k in fx.tensors if k.startswith("grad.param.")}
    assert set(names.values()) == stored
    return names


def test_internal_direct_matches_authors_3_18_23():
    fx = load_fixture("lin_internal_I_D_3-18-23")
    fusion = from_official("lin_internal", fx.checkpoint(), strategy="3-18-23")
    assert isinstance(fusion, InternalDirect)
    assert fusion.fused_layers == tuple(fx.config["fused_layers"]) == (0, 5, 6)
    _run(fx, fusion, [3, 18, 23])


def test_internal_modular_authors_mode_matches_authors_18():
    fx = load_fixture("lin_internal_I_M_18")
    fusion = from_official("lin_internal", fx.checkpoint(), strategy="18", num_heads=fx.config["num_attention_heads"])
    assert isinstance(fusion, InternalModular)
    assert fusion.mode == "authors"
    assert fusion.fused_layers == (5,)
    _run(fx, fusion, [18])


def test_internal_direct_layer_input_is_previous_output_plus_projection():
    fx = load_fixture("lin_internal_I_D_3-18-23")
    fusion = from_official("lin_internal", fx.checkpoint(), strategy="3-18-23")
    llm = _llm(fx)
    fusion.attach(llm)
    seen = {}
    for j in (0, 5, 6):
        llm.model.layers[j].register_forward_pre_hook(lambda m, a, j=j: seen.__setitem__(j, a[0].detach()))
    levels = [fx[f"input.vit.{k}"] for k in (3, 18, 23)]
    with torch.no_grad(), fusion.inject(levels, fx["image_token_mask"].bool()):
        llm(inputs_embeds=fx["inputs_embeds"], attention_mask=fx["attention_mask_spliced"])
    # hooks registered after attach see the injected hidden states, i.e. the fixture's layer_in
    for j in (0, 5, 6):
        assert_fixture_close(seen[j], fx[f"layer_in.{j}"], name=f"layer_in.{j}")
