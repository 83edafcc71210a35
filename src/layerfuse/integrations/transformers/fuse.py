"""``fuse_llava``: put a layerfuse fusion projector in place of an HF LLaVA model's ``multi_modal_projector``."""

from __future__ import annotations

from collections.abc import Sequence
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
from ...internal import InternalFusion
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


def fuse_llava(
    model: nn.Module,
    module: FusionProjector,
    *,
    internal: InternalFusion | None = None,
    internal_layers: Sequence[int] | None = None,
) -> nn.Module:
    """An HF LLaVA model whose image features are ``module(LayerTap(vision_tower, module.layers, tokens=module.tokens)(pixel_values))``.

    The vision tower, the LLM, ``lm_head`` (and LLaVA-NeXT's ``image_newline``) are taken over as they
    are, the same parameter objects; ``module`` becomes ``multi_modal_projector``. The result is an
    ordinary ``PreTrainedModel`` (forward with ``labels``, ``generate`` with the KV cache,
    ``save_pretrained``, gradient checkpointing) of the ``Layerfuse*`` class of the input's family, whose
    config is the input's config plus ``fusion`` (``module.get_config()``). Use the returned model, not
    the input: both share their submodules.

    With ``internal`` (an [`InternalFusion`][layerfuse.internal.InternalFusion]: I_D, I_M or DeepStack)
    the model also injects visual features inside its LLM: the same tap holds ``module.layers`` and
    ``internal_layers`` (one tower forward), ``module`` gives the input tokens, and level i (the patch
    tokens of ViT layer ``internal_layers[i]``, 2x2-window-ordered for a DeepStack patch merger) feeds
    decoder layer ``internal.fused_layers[i]`` at the image-token positions. The fusion is registered
    at ``model.model.internal_fusion`` (its weights save with the model, it is in ``FUSION_MODULES`` and
    `fusion_parameters`) and ``config.internal_fusion`` stores ``internal.fusion_config()`` and
    ``internal_layers``, so ``from_pretrained`` rebuilds it; its hooks go on the LLM at the first
    forward. ``generate`` injects at prefill (I_M's cross-attention reads the prefill's levels at every
    step). LLaVA-1.5 models only (anyres packing reorders the tokens the levels must follow).

    Args:
        model: a transformers ``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``
            (anyres: every crop goes through the tap and the fuser) or
            ``LlavaOnevisionForConditionalGeneration``, or an already fused model (its fusion projector is
            replaced).
        module: a `FusionProjector` (from ``build_fusion_projector``,
            ``from_official`` or built by hand) whose fuser widths equal the tower's hidden size and whose
            projector output equals the LLM's hidden size. It must be on the model's device.
        internal: an internal fusion (not attached to anything) whose ``in_dim`` is the tower's hidden
            size and ``hidden_size`` the LLM's, on the model's device; ``None`` for none.
        internal_layers: the ViT hidden-state index of each of ``internal``'s levels, one per
            ``internal.fused_layers``; required with ``internal``.

    Returns:
        A ``LayerfuseLlavaForConditionalGeneration`` (or ``...NextForConditionalGeneration`` /
        ``...OnevisionForConditionalGeneration``).

    Raises:
        TypeError: ``model`` is not one of the supported classes, ``module`` is not a FusionProjector,
            or ``internal`` is not an InternalFusion.
        ValueError: widths, layer indices or tokens that do not fit the tower (checked by building the
            tap), ``module`` or ``internal`` on another device than the model, ``internal`` with a
            LLaVA-NeXT / OneVision model, already attached, without ``internal_layers`` or with one of
            another length, or with decoder layers outside the LLM.

    Examples:
        With ``llava`` a `LlavaForConditionalGeneration` whose tower has 24 blocks (CLIP ViT-L/14-336);
        `examples/hf_llava_mmfuser.py` runs the whole flow on a tiny random model:

        ```python
        from layerfuse.presets import build_fusion_projector
        from layerfuse.integrations.transformers import fuse_llava
        module = build_fusion_projector("dense_connector_dci", dim=1024, llm_dim=4096, depth=24)
        fused = fuse_llava(llava, module)
        fused.save_pretrained("llava-dci")  # AutoModelForImageTextToText.from_pretrained("llava-dci")

        from layerfuse.internal import DeepStack
        deepstack = DeepStack(1024, 4096, projector="mlp2x_gelu")  # after decoder layers 0, 1, 2
        fused = fuse_llava(llava, module, internal=deepstack, internal_layers=[8, 16, 24])
        ```
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
    for name, part in (("module", module), ("internal", internal)):
        part_devices = {p.device for p in part.parameters()} if part is not None else set()
        if part_devices and part_devices != {device}:
            raise ValueError(
                f"{where}: {name} is on {sorted(map(str, part_devices))} but the model is on {device}; move it first"
            )
    internal_config = None
    if internal is not None or internal_layers is not None:
        internal_config = _internal_config(model, config_cls, internal, internal_layers)

    config = _fused_config(model.config, config_cls, module)
    config.internal_fusion = internal_config
    with torch.device("meta"):
        fused = model_cls(config)
    for name in _KEPT:
        if hasattr(base, name):
            setattr(fused.model, name, getattr(base, name))
    fused.model.multi_modal_projector = mark_initialized(module)
    if internal is not None:
        fused.model.internal_fusion = mark_initialized(internal)
    fused.lm_head = model.lm_head
    fused.generation_config = model.generation_config
    left = [n for n, t in [*fused.named_parameters(), *fused.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{where}: {type(model).__name__} has modules fuse_llava does not take over: {left[:5]}")
    fused.train(model.training)
    return fused


def _fused_config(config: Any, config_cls: type, module: FusionProjector) -> Any:
    values = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "fusion", "internal_fusion", "layerfuse_version"):
        values.pop(key, None)
    fused = config_cls(**values, fusion=module.get_config())
    fused.layerfuse_version = __version__
    # the submodules keep the config objects they were built with (attention implementation included)
    fused.vision_config, fused.text_config = config.vision_config, config.text_config
    fused._attn_implementation_internal = getattr(config, "_attn_implementation_internal", None)
    return fused


def _internal_config(
    model: nn.Module, config_cls: type, internal: InternalFusion | None, internal_layers: Sequence[int] | None
) -> dict[str, Any]:
    """``config.internal_fusion`` for ``internal`` fed by ``internal_layers``, after checking they fit the model."""
    where = "fuse_llava"
    if internal is None or internal_layers is None:
        raise ValueError(
            f"{where}: internal and internal_layers go together (the internal fusion and the ViT layer of each of "
            f"its levels); got internal={type(internal).__name__} and internal_layers={internal_layers!r}"
        )
    if not isinstance(internal, InternalFusion):
        raise TypeError(
            f"{where}: internal expected a layerfuse.internal InternalFusion (InternalDirect, InternalModular, "
            f"DeepStack), got {type(internal).__name__}"
        )
    if config_cls is not LayerfuseLlavaConfig:
        raise ValueError(
            f"{where}: internal fusion is supported in LlavaForConditionalGeneration only; anyres packing "
            f"({type(model).__name__}) reorders the image tokens that the internal levels must follow"
        )
    if internal.attached:
        raise ValueError(f"{where}: internal is attached to an LLM; detach() it first (the fused model attaches it)")
    tower_dim = int(model.config.vision_config.hidden_size)
    llm_dim = int(model.config.text_config.hidden_size)
    widths = {"in_dim": (getattr(internal, "in_dim", tower_dim), tower_dim, "the vision tower's hidden size"),
              "hidden_size": (getattr(internal, "hidden_size", llm_dim), llm_dim, "the LLM's hidden size")}
    for name, (got, expected, what) in widths.items():
        if got != expected:
            raise ValueError(f"{where}: internal.{name} is {got} but {what} is {expected}")
    # builds (and drops) the tap: refuses layer indices past the tower's depth
    tap = LayerTap(model.model.vision_tower, internal_layers, tokens="patch")
    layers = [int(i) for i in tap.layers]
    tap.remove()
    if len(layers) != len(internal.fused_layers):
        raise ValueError(
            f"{where}: internal_layers expected {len(internal.fused_layers)} ViT layers (one per fused decoder layer "
            f"{list(internal.fused_layers)}), got {layers}"
        )
    # refuses decoder layers outside the LLM, with the fusion's own message
    internal.attach(model.model.language_model)
    internal.detach()
    return {"fusion": internal.fusion_config(), "layers": layers}
