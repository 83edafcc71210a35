"""An internal fusion (I_D, I_M, DeepStack) held by a fused HF LLaVA model and fed by the same tower forward.

The model stores the fusion at ``model.model.internal_fusion`` (its weights save with the model) and
its description in ``config.internal_fusion``::

```text
{"fusion": InternalFusion.fusion_config(), "layers": [ViT hidden-state index of each level]}
```

The fusion's hooks are put on the LLM lazily, at the first forward (and again whenever the LLM or the
active PEFT copy of the fusion changed), so building on the meta device, ``from_pretrained``,
``deepcopy`` and PEFT's ``modules_to_save`` copy all end with exactly one attached fusion.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn

from ...features import LayerFeatures
from ...internal import DeepStack, InternalFusion
from ...internal.deepstack import window_order

__all__ = ["active_internal_fusion", "internal_fusion_config", "split_internal_levels"]


def internal_fusion_config(where: str, config: Any) -> dict[str, Any] | None:
    """``config.internal_fusion`` checked, or ``None`` when the model has no internal fusion."""
    value = getattr(config, "internal_fusion", None)
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or not isinstance(value.get("fusion"), dict)
        or not isinstance(value.get("layers"), list)
    ):
        raise ValueError(
            f"{where}: config.internal_fusion expected {{'fusion': InternalFusion.fusion_config(), 'layers': [ViT "
            f"layer of each level]}} as fuse_llava stores it, got {value!r:.200}"
        )
    return value


def active_internal_fusion(holder: nn.Module, llm: nn.Module) -> InternalFusion:
    """The fusion that runs: ``holder`` itself, or under PEFT ``modules_to_save`` the active adapter's copy.

    It is attached to ``llm`` (once), and every other copy inside ``holder`` that is attached to ``llm``
    is detached, so features are never injected twice.
    """
    fusion: Any = holder
    if not isinstance(holder, InternalFusion):
        # peft.utils.other.ModulesToSaveWrapper: original_module plus one trained copy per adapter
        original = getattr(holder, "original_module", None)
        copies = getattr(holder, "modules_to_save", None)
        if not isinstance(original, InternalFusion) or not isinstance(copies, nn.ModuleDict):
            raise TypeError(
                f"internal_fusion expected an InternalFusion (or PEFT's modules_to_save wrapper of one), got "
                f"{type(holder).__name__}"
            )
        active = [a for a in getattr(holder, "active_adapters", ()) if a in copies]
        fusion = original if getattr(holder, "disable_adapters", False) or not active else copies[active[0]]
    if _ATTACHED.get(llm) is fusion and fusion._attached_to is llm:
        return fusion
    previous = _ATTACHED.pop(llm, None)
    if previous is not None:
        previous.detach()
    for other in holder.modules():
        if isinstance(other, InternalFusion) and other._attached_to is llm:
            other.detach()
    # a deepcopy (PEFT's trained copy, a copied model) believes it is attached; its hooks are the copy's
    fusion.detach()
    fusion.attach(llm)
    _ATTACHED[llm] = fusion
    return fusion


# LLM -> the fusion this integration attached to it; an attached flag alone cannot tell a deepcopy
# (whose weak reference still names the LLM) from the fusion whose hooks are really registered
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, InternalFusion] = weakref.WeakKeyDictionary()


def split_internal_levels(
    features: LayerFeatures, count: int, tokens: str, num_prefix_tokens: int, fusion: InternalFusion
) -> tuple[LayerFeatures, list[Tensor]]:
    """Split one tap's output into the fusion projector's levels and the internal fusion's levels.

    The tap returns the projector's ``count`` layers first, with its ``tokens`` choice; the internal
    levels keep only the patch tokens (one per image token), in 2x2-window order for a DeepStack
    patch merger (Qwen3-VL's processor order; the tap gives raster order).
    """
    head = LayerFeatures(features[:count], grid=features.grid, layers=features.layers[:count])
    prefix = {"patch": 0, "cls_patch": 1}.get(tokens, num_prefix_tokens)
    levels = [level[:, prefix:] for level in features[count:]]
    if isinstance(fusion, DeepStack) and fusion.projector_kind == "patch_merger":
        levels = [window_order(level, features.grid, fusion.merge_size) for level in levels]
    return head, levels


def image_token_mask(model: nn.Module, input_ids: Tensor | None, inputs_embeds: Tensor | None) -> Tensor:
    """(B, L) bool: where the image placeholders are, found as ``LlavaModel.get_placeholder_mask`` finds them."""
    image_token_id = model.config.image_token_id
    if input_ids is not None:
        return input_ids == image_token_id
    assert inputs_embeds is not None
    token = torch.full((), image_token_id, dtype=torch.long, device=inputs_embeds.device)
    return (inputs_embeds == model.get_input_embeddings()(token)).all(-1)
