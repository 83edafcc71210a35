"""MMFuser, Dense Connector and Lin et al. inside the LLaVA codebase, offline, on random weights.

``layerfuse.integrations.llava.patch()`` installs layerfuse's ``build_vision_projector`` and
``build_vision_tower`` into the ``llava`` package; LLaVA's own ``initialize_vision_modules`` then
builds a fused ``mm_projector`` from ``--mm_projector_type`` alone. A tiny Llama and a tiny CLIP tower
(saved to a temporary folder, so LLaVA loads it by path as it loads ``openai/clip-vit-large-patch14-336``)
stand in for Vicuna and CLIP-L; each type trains a few stage-1 steps (only ``mm_projector``), saves
the stage-1 ``mm_projector.bin`` and reloads it the way ``--pretrain_mm_mlp_adapter`` does.

Needs ``layerfuse[hf]`` and the LLaVA codebase: ``pip install llava-torch --no-deps``. Nothing is
downloaded.

    python examples/llava_codebase.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
from transformers.utils import logging as hf_logging

import layerfuse.integrations.llava

layerfuse.integrations.llava.patch()  # the whole change to a LLaVA training script: this line and the import

from llava.model import LlavaLlamaForCausalLM  # noqa: E402
from llava.model.language_model.llava_llama import LlavaConfig  # noqa: E402

IMAGE_TOKEN_INDEX = -200  # llava.constants.IMAGE_TOKEN_INDEX


def save_tiny_tower(path: Path) -> None:
    config = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=24, num_attention_heads=4,
                              image_size=56, patch_size=14)
    CLIPVisionModel(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(path)


def build(tower: Path, projector_type: str, adapter: Path | None = None) -> LlavaLlamaForCausalLM:
    """What LLaVA's train.py does with --vision_tower, --mm_projector_type, --pretrain_mm_mlp_adapter."""
    model = LlavaLlamaForCausalLM(LlavaConfig(
        vocab_size=128, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4,
    ))
    model.get_model().initialize_vision_modules(SimpleNamespace(
        vision_tower=str(tower), mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        pretrain_mm_mlp_adapter=None if adapter is None else str(adapter), mm_patch_merge_type="flat",
        mm_projector_type=projector_type,
    ))
    return model


def main() -> None:
    hf_logging.disable_progress_bar()  # LLaVA loads the tiny tower by path, as it would CLIP-L: no bars for that
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tower = Path(tmp) / "tower"
        save_tiny_tower(tower)
        ids = torch.randint(3, 128, (2, 12))
        ids[:, 1] = IMAGE_TOKEN_INDEX
        labels = ids.clone()
        labels[:, :2] = -100
        images = torch.randn(2, 3, 56, 56)

        for projector_type in ("mmfuser", "dense_connector_dci", "lin_ed_3_18_23"):
            model = build(tower, projector_type)
            projector = model.get_model().mm_projector
            print(f"{projector_type}: {type(projector.fuser).__name__} on hidden states {list(projector.layers)}, "
                  f"{sum(p.numel() for p in projector.parameters())} parameters under mm_projector")

            # stage 1 (--tune_mm_mlp_adapter): only mm_projector trains
            model.requires_grad_(False)
            projector.requires_grad_(True)
            optimizer = torch.optim.AdamW(projector.parameters(), lr=1e-3)
            for step in range(3):
                loss = model(input_ids=ids, labels=labels, images=images).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                print(f"  step {step}: loss {loss.item():.4f}")

            # the stage-1 file LLaVA writes (every key containing mm_projector) and the stage-2 reload
            adapter = Path(tmp) / f"{projector_type}.bin"
            torch.save({k: v.detach().clone() for k, v in model.named_parameters() if "mm_projector" in k}, adapter)
            stage2 = build(tower, projector_type, adapter)
            with torch.no_grad():
                same = torch.equal(stage2.encode_images(images), model.encode_images(images))
            print(f"  visual tokens {tuple(model.encode_images(images).shape)}; reloaded adapter gives "
                  f"identical tokens: {same}; recorded in config: {model.config.mm_layerfuse['projector_type']}")


if __name__ == "__main__":
    main()
