"""Training a fused HF LLaVA model as LLaVA does: stage 1 (fusion only), stage 2 (LLM + fusion, optional LoRA).

PEFT never wraps a fusion module when it is named in ``modules_to_save``: PEFT excludes those modules
from adapter matching and trains (and saves) a full copy of them instead, which is what a fusion
projector needs. `set_training_stage` does that for you; with a hand-made ``LoraConfig`` pass
``modules_to_save=list(FUSION_MODULES)``. Name-list recipes (LLaVA's ``find_all_linear_names``,
`llm_linear_names`) collect LLM leaf names that PEFT matches as suffixes anywhere in the model;
no fuser leaf module shares a name with the linear layers of the common LLM families, so those lists
never reach into the fusion projector either.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from ..._optional import require
from ...fusers.pipeline import FusionProjector
from ...internal import InternalFusion

__all__ = [
    "FUSION_MODULES",
    "fusion_parameters",
    "llm_linear_names",
    "set_training_stage",
]

# What `modules_to_save` needs to keep the fusion projector (and an internal fusion, when the model
# has one) out of LoRA and in the adapter checkpoint.
FUSION_MODULES: tuple[str, ...] = ("multi_modal_projector", "internal_fusion")

# Module names LLaVA's find_all_linear_names skips, in the HF model's naming.
_MULTIMODAL_KEYWORDS = ("multi_modal_projector", "internal_fusion", "vision_tower")


def _fusion_modules(where: str, model: nn.Module) -> list[nn.Module]:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, (FusionProjector, InternalFusion))]
    if not found:
        raise ValueError(f"{where}: {type(model).__name__} holds no FusionProjector; build the model with fuse_llava")
    # under PEFT's modules_to_save the trained copy lives next to a frozen original_module
    trained = [m for n, m in found if ".original_module" not in f".{n}"]
    return trained or [m for _, m in found]


def fusion_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the model's fusion projector (fuser + projector) and internal fusion, if any.

    E.g. for their own learning rate.

    As LLaVA's ``mm_projector_lr``: ``[{"params": fusion_parameters(m), "lr": 2e-5}, {"params": rest}]``.
    Works on a fused model and on its PEFT wrapper (the trained ``modules_to_save`` copy).

    Raises:
        ValueError: the model holds no `FusionProjector`.
    """
    seen: dict[int, nn.Parameter] = {}
    for module in _fusion_modules("fusion_parameters", model):
        for p in module.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def llm_linear_names(model: nn.Module) -> list[str]:
    """LLaVA's ``find_all_linear_names`` on an HF model: leaf names of the LLM's linear layers.

    Skips the vision tower, the fusion projector and ``lm_head``, exactly like the recipe in LLaVA's
    ``train.py`` with the HF module names. Pass the result as ``LoraConfig(target_modules=...)``.
    """
    names = set()
    for name, module in model.named_modules():
        if any(k in name for k in _MULTIMODAL_KEYWORDS):
            continue
        if isinstance(module, nn.Linear):
            names.add(name.rsplit(".", 1)[-1])
    names.discard("lm_head")
    return sorted(names)


def set_training_stage(model: nn.Module, stage: int, *, lora: Any = None) -> nn.Module:
    """Freeze and unfreeze as LLaVA's two stages do; returns the model to train.

    - stage 1 (feature alignment): only the fusion projector trains; the tower and the LLM are frozen.
    - stage 2 (instruction tuning): the fusion projector and the LLM train (``lm_head`` included), the
      tower stays frozen. With ``lora`` (a PEFT ``LoraConfig``) the LLM is frozen instead and LoRA
      adapters train on it: the config is copied, ``FUSION_MODULES`` added to its ``modules_to_save``
      (so LoRA never wraps a fusion module and the adapter checkpoint holds the fusion weights) and,
      unless it sets ``exclude_modules``, the vision tower excluded; the PEFT model is returned.

    Args:
        model: a fused model from [`fuse_llava`][layerfuse.integrations.transformers.fuse_llava].
        stage: ``1`` or ``2``.
        lora: a ``peft.LoraConfig`` for stage 2, or ``None``.

    Raises:
        ValueError: another stage, ``lora`` with stage 1, or a model without a fusion projector.
        ImportError: ``lora`` given without ``peft`` installed.
    """
    where = "set_training_stage"
    if stage not in (1, 2):
        raise ValueError(f"{where}: stage expected 1 or 2, got {stage!r}")
    if stage == 1 and lora is not None:
        raise ValueError(f"{where}: stage 1 trains only the fusion projector; lora is for stage 2")
    fusion = fusion_parameters(model)
    model.requires_grad_(False)
    for p in fusion:
        p.requires_grad_(True)
    if stage == 1:
        return model
    if lora is None:
        model.get_submodule("model.language_model").requires_grad_(True)
        model.get_output_embeddings().requires_grad_(True)
        return model
    peft = require("peft", extra="peft", purpose="set_training_stage(..., lora=...)")
    config = copy.deepcopy(lora)
    config.modules_to_save = sorted({*(config.modules_to_save or ()), *FUSION_MODULES})
    if getattr(config, "exclude_modules", None) is None:
        config.exclude_modules = r".*\bvision_tower\b.*"
    return peft.get_peft_model(model, config)
