"""Export a channel-concatenation fusion + LLaVA projector to HF ``LlavaForConditionalGeneration``.

HF LLaVA (transformers >= 4.48) accepts a list-valued ``vision_feature_layer``: it takes
``hidden_states[k]`` for each listed k, drops token 0 of each when
``vision_feature_select_strategy="default"`` (keeps every token with ``"full"``), concatenates them
on channels in list order and applies ``multi_modal_projector`` = ``linear_1``, GELU, ``linear_2``.
That is exactly a [`ConcatFuser`][layerfuse.ConcatFuser] whose terms are single layers followed by an
``mlp2x_gelu`` [`Projector`][layerfuse.Projector] (Dense Connector SCI, Lin et al. ``18``/``3-18-23``, the
3-18-23 fusion, ``slicefour``). With the LayerNorm of ViP-LLaVA it is HF ``VipLlavaForConditionalGeneration``.
Group means (DCI, ``former``/``latter``/``all``) have no HF equivalent and are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..fusers.concat import ConcatFuser
from ..fusers.pipeline import FusionProjector
from ..serialization import load_strict
from ..taps.backbones import find_backbone

__all__ = ["HFLlavaExport", "to_hf_llava"]


@dataclass
class HFLlavaExport:
    """The HF side of an exported fusion projector.

    Attributes:
        architecture: ``"LlavaForConditionalGeneration"`` or ``"VipLlavaForConditionalGeneration"``.
        config: the ``LlavaConfig`` / ``VipLlavaConfig`` fields that define the vision features and
            projector (``vision_feature_layer``, ``vision_feature_select_strategy``,
            ``projector_hidden_act``, ...); pass them to the config constructor.
        projector_state: ``multi_modal_projector`` weights, keys relative to it (``linear_1.weight``,
            ``linear_2.bias``, and ``projector_layernorm.*`` for ViP-LLaVA).
        vision_prefix_tokens: the prefix tokens (CLS, registers) of the vision tower the export was
            made for; ``load_into`` refuses a model whose tower has another count.
    """

    architecture: str
    config: dict[str, Any]
    projector_state: dict[str, Tensor] = field(repr=False)
    vision_prefix_tokens: int

    def state_dict(self, prefix: str = "model.multi_modal_projector.") -> dict[str, Tensor]:
        """The projector weights under their full key in a transformers 5 checkpoint."""
        return {prefix + k: v for k, v in self.projector_state.items()}

    def load_into(self, model: nn.Module) -> None:
        """Copy the projector weights into an HF LLaVA model built from a config with `config`.

        Checks that the model's config agrees with `config` (else its features would be built
        from other layers), that its vision tower has `vision_prefix_tokens` prefix tokens (else HF
        would drop a real patch, or keep a CLS token the module never saw), and loads strictly (nothing
        is copied on a mismatch).

        Raises:
            ValueError: a config field or the tower's prefix-token count differs from the export's, or
                the weights do not fit.
            TypeError: ``model`` has no ``multi_modal_projector``.
        """
        where = "HFLlavaExport.load_into"
        tower = next((m for p in ("model.vision_tower", "vision_tower") if (m := _submodule(model, p)) is not None), None)
        if tower is None:
            raise TypeError(f"{where}: {type(model).__name__} has no vision_tower; expected an HF LLaVA model")
        prefix = find_backbone(tower).num_prefix_tokens
        if prefix != self.vision_prefix_tokens:
            raise ValueError(
                f"{where}: the model's vision tower ({type(tower).__name__}) has {prefix} prefix token(s) but the "
                f"export was made for {self.vision_prefix_tokens}; export again with to_hf_llava(module, "
                "vision_tower=model.model.vision_tower)"
            )
        config = getattr(model, "config", None)
        for key, value in self.config.items():
            have = getattr(config, key, None)
            have = list(have) if isinstance(have, (list, tuple)) else have
            if have != value:
                raise ValueError(
                    f"{where}: model.config.{key} is {have!r} but the export needs {value!r}; build the model "
                    f"from a config created with **export.config"
                )
        for path in ("model.multi_modal_projector", "multi_modal_projector"):
            projector = _submodule(model, path)
            if projector is not None:
                load_strict(projector, dict(self.projector_state), source=where)
                return
        raise TypeError(f"{where}: {type(model).__name__} has no multi_modal_projector; expected an HF LLaVA model")


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _prefix_tokens(where: str, vision_tower: nn.Module | None, vision_prefix_tokens: int | None) -> int:
    """The tower's prefix-token count: read from ``vision_tower``, else as given, else refused."""
    if vision_tower is not None:
        found = find_backbone(vision_tower).num_prefix_tokens
        if vision_prefix_tokens is not None and vision_prefix_tokens != found:
            raise ValueError(
                f"{where}: vision_prefix_tokens={vision_prefix_tokens} but {type(vision_tower).__name__} has {found}"
            )
        return found
    if vision_prefix_tokens is None:
        raise ValueError(
            f"{where}: the vision tower's prefix-token count decides which token HF drops, and it is unknown; pass "
            "vision_tower= (the HF tower the model uses, read from it) or vision_prefix_tokens= (1 for CLIP, 0 for "
            "SigLIP)"
        )
    if isinstance(vision_prefix_tokens, bool) or not isinstance(vision_prefix_tokens, int) or vision_prefix_tokens < 0:
        raise ValueError(f"{where}: vision_prefix_tokens expected an int >= 0, got {vision_prefix_tokens!r}")
    return vision_prefix_tokens


def _dropped_tokens(tokens: str, prefix_tokens: int, drop_first: bool) -> int:
    if tokens == "patch":
        dropped = prefix_tokens
    elif tokens == "cls_patch":
        dropped = prefix_tokens - 1 if prefix_tokens else 0
    else:
        dropped = 0
    return dropped + int(drop_first)


def to_hf_llava(
    module: FusionProjector | str | Path,
    *,
    vision_tower: nn.Module | None = None,
    vision_prefix_tokens: int | None = None,
) -> HFLlavaExport:
    """Express a channel-concatenation [`FusionProjector`][layerfuse.FusionProjector] as an HF LLaVA projector.

    HF drops either exactly token 0 of each hidden state (``"default"``) or nothing (``"full"``), so
    the export must know how many prefix tokens the tower has: on SigLIP (none) ``"default"`` would drop
    a real patch. The count is read from ``vision_tower``; without a tower it must be given.

    Args:
        module: the module, or a directory written by its ``save_pretrained``.
        vision_tower: the HF vision tower the LLaVA model uses (``CLIPVisionModel``,
            ``SiglipVisionModel``, ...); its prefix-token count is read from it.
        vision_prefix_tokens: the prefix-token count when no tower is at hand (1 for CLIP's CLS, 0 for
            SigLIP); must agree with ``vision_tower`` when both are given.

    Returns:
        An [`HFLlavaExport`][layerfuse.convert.hf_llava.HFLlavaExport]: ``LlavaConfig(vision_config=..., text_config=..., **export.config)``,
        build the model, then ``export.load_into(model)``.

    Raises:
        TypeError: the fuser is not a [`ConcatFuser`][layerfuse.ConcatFuser].
        ValueError: group means, a projector other than ``mlp2x_gelu``, token handling HF cannot
            express, or neither ``vision_tower`` nor ``vision_prefix_tokens``.

    Examples:
        ```python
        module = from_official("lin_ed", sd, strategy="3-18-23")
        export = to_hf_llava(module, vision_prefix_tokens=1)   # CLIP; or vision_tower=...
        export.config["vision_feature_layer"]  # [3, 18, 23]
        ```
    """
    where = "to_hf_llava"
    if isinstance(module, (str, Path)):
        module = FusionProjector.from_pretrained(module)
    if not isinstance(module, FusionProjector):
        raise TypeError(f"{where}: module expected a FusionProjector or a saved directory, got {type(module).__name__}")
    prefix = _prefix_tokens(where, vision_tower, vision_prefix_tokens)
    fuser, projector = module.fuser, module.projector
    if not isinstance(fuser, ConcatFuser):
        raise TypeError(
            f"{where}: HF LLaVA concatenates plain layers on channels; a {type(fuser).__name__} cannot be "
            "expressed (only ConcatFuser can)"
        )
    means = [list(g) for g in fuser.terms if len(g) > 1]
    if means:
        raise ValueError(
            f"{where}: the fuser averages layer groups (inputs {means}); HF vision_feature_layer lists single "
            "layers only, so group means (Dense Connector DCI, Lin former/latter/all) cannot be exported"
        )
    if projector.kind != "mlp2x_gelu":
        raise ValueError(
            f"{where}: HF LLaVA's multi_modal_projector is Linear, GELU, Linear (mlp2x_gelu); got "
            f"projector kind {projector.kind!r}"
        )
    dropped = _dropped_tokens(module.tokens, prefix, fuser.drop_first_token)
    if dropped not in (0, 1):
        raise ValueError(
            f"{where}: tokens={module.tokens!r} with {prefix} prefix token(s) drops {dropped} "
            "leading tokens per layer; HF drops exactly 1 ('default') or 0 ('full')"
        )
    layers = [module.layers[g[0]] for g in fuser.terms]
    config: dict[str, Any] = {
        "vision_feature_layer": layers[0] if len(layers) == 1 else layers,
        "projector_hidden_act": "gelu",
    }
    state = {
        "linear_1.weight": projector[0].weight.detach().clone(),
        "linear_1.bias": projector[0].bias.detach().clone(),
        "linear_2.weight": projector[2].weight.detach().clone(),
        "linear_2.bias": projector[2].bias.detach().clone(),
    }
    if fuser.norm is None:
        config["vision_feature_select_strategy"] = "default" if dropped else "full"
        config["multimodal_projector_bias"] = True
        return HFLlavaExport("LlavaForConditionalGeneration", config, state, prefix)
    if dropped != 1:
        raise ValueError(f"{where}: HF VipLlava always drops token 0 of each layer; this module drops {dropped}")
    config["projector_layernorm_eps"] = fuser.eps
    state["projector_layernorm.weight"] = fuser.norm.weight.detach().clone()
    state["projector_layernorm.bias"] = fuser.norm.bias.detach().clone()
    return HFLlavaExport("VipLlavaForConditionalGeneration", config, state, prefix)
