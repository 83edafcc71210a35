"""``fuse_llava``: put a layerfuse fusion projector in place of an HF LLaVA model's ``multi_modal_projector``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
)

from ..._version import __version__
from ...fusers.pipeline import FusionProjector
from ...taps import LayerTap
from .modeling import (
    LayerfuseLlavaConfig,
    LayerfuseLlavaForConditionalGeneration,
    LayerfuseLlavaNextConfig,
    LayerfuseLlavaNextForConditionalGeneration,
    LayerfuseLlavaOnevisionConfig,
    LayerfuseLlavaOnevisionForConditionalGeneration,
    mark_initialized,
)

__all__ = ["fuse_llava"]

# stock class -> (fused config class, fused model class); checked in order, subclasses first
_FAMILIES: tuple[tuple[type, type, type], ...] = (
    (LlavaOnevisionForConditionalGeneration, LayerfuseLlavaOnevisionConfig, LayerfuseLlavaOnevisionForConditionalGeneration),
    (LlavaNextForConditionalGeneration, LayerfuseLlavaNextConfig, LayerfuseLlavaNextForConditionalGeneration),
    (LlavaForConditionalGeneration, LayerfuseLlavaConfig, LayerfuseLlavaForConditionalGeneration),
)

# modules of the stock model the fused model takes over unchanged (the projector is replaced)
_KEPT = ("vision_tower", "language_model", "image_newline")


def fuse_llava(model: nn.Module, module: FusionProjector) -> nn.Module:
    """An HF LLaVA model whose image features are ``module(LayerTap(vision_tower, module.layers, tokens=module.tokens)(pixel_values))``.

    The vision tower, the LLM, ``lm_head`` (and LLaVA-NeXT's ``image_newline``) are taken over as they
    are, the same parameter objects; ``module`` becomes ``multi_modal_projector``. The result is an
    ordinary ``PreTrainedModel`` (forward with ``labels``, ``generate`` with the KV cache,
    ``save_pretrained``, gradient checkpointing) of the ``Layerfuse*`` class of the input's family, whose
    config is the input's config plus ``fusion`` (``module.get_config()``). Use the returned model, not
    the input: both share their submodules.

    Args:
        model: a transformers ``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``
            (anyres: every crop goes through the tap and the fuser) or
            ``LlavaOnevisionForConditionalGeneration``, or an already fused model (its fusion projector is
            replaced).
        module: a `FusionProjector` (from ``build_fusion_projector``,
            ``from_official`` or built by hand) whose fuser widths equal the tower's hidden size and whose
            projector output equals the LLM's hidden size. It must be on the model's device.

    Returns:
        A ``LayerfuseLlavaForConditionalGeneration`` (or ``...NextForConditionalGeneration`` /
        ``...OnevisionForConditionalGeneration``).

    Raises:
        TypeError: ``model`` is not one of the supported classes, or ``module`` is not a FusionProjector.
        ValueError: widths, layer indices or tokens that do not fit the tower (checked by building the
            tap), or ``module`` on another device than the model.

    Examples:
        >>> from layerfuse.presets import build_fusion_projector
        >>> from layerfuse.integrations.transformers import fuse_llava
        >>> module = build_fusion_projector("dense_connector_dci", dim=1024, llm_dim=4096)
        >>> fused = fuse_llava(llava, module)      # llava: LlavaForConditionalGeneration
        >>> fused.save_pretrained("llava-dci")    # AutoModelForImageTextToText.from_pretrained("llava-dci")
    """
    where = "fuse_llava"
    family = next(((cfg, cls) for stock, cfg, cls in _FAMILIES if isinstance(model, stock)), None)
    if family is None:
        names = ", ".join(stock.__name__ for stock, _, _ in _FAMILIES)
        raise TypeError(f"{where}: model expected one of {names}, got {type(model).__name__}")
    if not isinstance(module, FusionProjector):
        raise TypeError(
            f"{where}: module expected a layerfuse FusionProjector (build_fusion_projector, from_official), got "
            f"{type(module).__name__}"
        )
    config_cls, model_cls = family
    base = model.model
    tower_dim = int(model.config.vision_config.hidden_size)
    llm_dim = int(model.config.text_config.hidden_size)
    if any(d != tower_dim for d in module.fuser.in_dims):
        raise ValueError(
            f"{where}: the fuser expects input widths {list(module.fuser.in_dims)} but the vision tower's hidden "
            f"size is {tower_dim}"
        )
    if module.out_dim != llm_dim:
        raise ValueError(
            f"{where}: the projector returns width {module.out_dim} but the LLM's hidden size is {llm_dim}"
        )
    # builds (and drops) the tap: refuses layer indices past the tower's depth and tokens it cannot give
    LayerTap(base.vision_tower, module.layers, tokens=module.tokens).remove()
    device = next(model.parameters()).device
    module_devices = {p.device for p in module.parameters()}
    if module_devices and module_devices != {device}:
        raise ValueError(
            f"{where}: module is on {sorted(map(str, module_devices))} but the model is on {device}; move it first"
        )

    config = _fused_config(model.config, config_cls, module)
    with torch.device("meta"):
        fused = model_cls(config)
    for name in _KEPT:
        if hasattr(base, name):
            setattr(fused.model, name, getattr(base, name))
    fused.model.multi_modal_projector = mark_initialized(module)
    fused.lm_head = model.lm_head
    fused.generation_config = model.generation_config
    left = [n for n, t in [*fused.named_parameters(), *fused.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{where}: {type(model).__name__} has modules fuse_llava does not take over: {left[:5]}")
    fused.train(model.training)
    return fused


def _fused_config(config: Any, config_cls: type, module: FusionProjector) -> Any:
    values = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "fusion", "layerfuse_version"):
        values.pop(key, None)
    fused = config_cls(**values, fusion=module.get_config())
    fused.layerfuse_version = __version__
    # the submodules keep the config objects they were built with (attention implementation included)
    fused.vision_config, fused.text_config = config.vision_config, config.text_config
    fused._attn_implementation_internal = getattr(config, "_attn_implementation_internal", None)
    return fused
