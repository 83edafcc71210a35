"""Tiny real Hugging Face LLaVA models (CLIP tower + Llama) and one fusion projector per fuser family."""

from __future__ import annotations

import torch

from layerfuse import (
    ConcatFuser,
    CrossAttentionFuser,
    FusionProjector,
    InstructionGatedFuser,
    MMFuser,
    Projector,
    TokenConcatFuser,
    WeightedSumFuser,
)
from layerfuse.presets import build_fusion_projector

DIM, LLM, DEPTH, IMAGE, PATCH = 16, 32, 4, 16, 4
GRID = IMAGE // PATCH
VOCAB, IMAGE_TOKEN, PAD = 64, 63, 0
TEXT_DIM = 8


def configs(tower: str = "clip"):
    import transformers

    if tower == "clip":
        vision = transformers.CLIPVisionConfig(
            hidden_size=DIM, intermediate_size=32, num_hidden_layers=DEPTH, num_attention_heads=2,
            image_size=IMAGE, patch_size=PATCH, projection_dim=DIM,
        )
    else:
        vision = transformers.SiglipVisionConfig(
            hidden_size=DIM, intermediate_size=32, num_hidden_layers=DEPTH, num_attention_heads=2,
            image_size=IMAGE, patch_size=PATCH, vision_use_head=False,
        )
    text = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=LLM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
    )
    return vision, text


def llava(tower: str = "clip"):
    import transformers

    vision, text = configs(tower)
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, image_seq_length=GRID * GRID,
    )
    return transformers.LlavaForConditionalGeneration(config).eval()


def perturb(module: torch.nn.Module, scale: float = 0.2) -> torch.nn.Module:
    """Move every parameter off its initial value so no branch is an identity or zero."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)
    return module


def _with_projector(fuser, layers, tokens="patch"):
    return FusionProjector(fuser, Projector("mlp2x_gelu", fuser.out_dim, LLM), layers=layers, tokens=tokens)


def fusion_projector(family: str) -> FusionProjector:
    """A small perturbed fusion projector of ``family`` for the tiny tower (16 x 16 images, 4 x 4 patches)."""
    if family == "concat":
        module = _with_projector(ConcatFuser([DIM] * 3), [1, 3, -2])
    elif family == "dci":
        module = build_fusion_projector("dense_connector_dci", dim=DIM, llm_dim=LLM, depth=DEPTH)
    elif family == "token_concat_1d":
        module = _with_projector(TokenConcatFuser(DIM, 3, pool="1d", window=4), [-2, 1, 2])
    elif family == "token_concat_2d":
        module = _with_projector(TokenConcatFuser(DIM, 2, pool="2d", window=(2, 2)), [-2, 2])
    elif family == "weighted_sum":
        module = _with_projector(WeightedSumFuser(DIM, 3), [2, 3, 4])
    elif family == "comm_lln":
        module = build_fusion_projector("comm_clip", dim=DIM, llm_dim=LLM, depth=DEPTH)
    elif family == "mmfuser":
        module = _with_projector(MMFuser(DIM, 2, heads=2, points=2), [1, 2, -2])
    elif family == "cross_attention":
        module = _with_projector(CrossAttentionFuser(DIM, 2, 2, self_attn=True, mlp_ratio=2.0), [1, 2, -2])
    elif family == "cross_attention_windowed":
        module = _with_projector(CrossAttentionFuser(DIM, 2, 2, window=2), [1, 2, -2])
    elif family == "igva":
        fuser = InstructionGatedFuser(
            DIM, TEXT_DIM, groups=[[1, 2], [3, 4]], base_layer=-2, gate_dim=8, num_blocks=1, num_heads=2
        )
        module = _with_projector(fuser, fuser.layers, tokens="cls_patch")
    else:
        raise KeyError(family)
    return perturb(module)


FAMILIES = (
    "concat", "dci", "token_concat_1d", "token_concat_2d", "weighted_sum", "comm_lln", "mmfuser",
    "cross_attention", "cross_attention_windowed", "igva",
)


def prompt(num_image_tokens: int, batch: int = 2, before: int = 3, after: int = 4, seed: int = 0) -> torch.Tensor:
    """(batch, before + num_image_tokens + after) ids with the image placeholders in the middle."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, IMAGE_TOKEN - 1, (batch, before + num_image_tokens + after), generator=g)
    ids[:, before:before + num_image_tokens] = IMAGE_TOKEN
    return ids
