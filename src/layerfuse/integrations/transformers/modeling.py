"""Hugging Face LLaVA models whose ``multi_modal_projector`` is a layerfuse fusion projector.

Each class subclasses the transformers class of the same family and changes one thing: the image
features are ``LayerTap`` on the model's own vision tower (only the hidden states the fusion needs, the
forward stopped after the deepest one), then the `FusionProjector` stored at
``multi_modal_projector``. Everything else (the placeholder scatter, the LLM, the loss, ``generate``,
LLaVA-NeXT's anyres packing) is the transformers code. The fusion's architecture lives in
``config.fusion`` (``FusionProjector.get_config()``), so ``save_pretrained`` / ``from_pretrained``
and the Auto classes rebuild it without remote code.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextModel,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionModel,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from ...fusers.pipeline import FusionProjector
from ...internal import InternalFusion
from ...taps import LayerTap
from .internal import active_internal_fusion, image_token_mask, internal_fusion_config, split_internal_levels

__all__ = [
    "FUSED_MODEL_TYPES",
    "LayerfuseLlavaConfig",
    "LayerfuseLlavaForConditionalGeneration",
    "LayerfuseLlavaModel",
    "LayerfuseLlavaNextConfig",
    "LayerfuseLlavaNextForConditionalGeneration",
    "LayerfuseLlavaNextModel",
    "LayerfuseLlavaOnevisionConfig",
    "LayerfuseLlavaOnevisionForConditionalGeneration",
    "LayerfuseLlavaOnevisionModel",
    "mark_initialized",
    "register_auto_classes",
    "takes_instruction",
]

# b images (crops for anyres), t visual tokens per image, d LLM width, e instruction width


class LayerfuseLlavaConfig(LlavaConfig):
    """``LlavaConfig`` plus ``fusion``: the ``FusionProjector.get_config()`` of ``multi_modal_projector``.

    And ``internal_fusion``, ``None`` or ``{"fusion": InternalFusion.fusion_config(), "layers": [...]}``:
    the internal fusion held at ``model.internal_fusion`` and the ViT layer of each of its levels.
    """

    model_type = "layerfuse_llava"
    fusion: dict | None = None
    internal_fusion: dict | None = None


class LayerfuseLlavaNextConfig(LlavaNextConfig):
    """``LlavaNextConfig`` plus ``fusion`` (see `LayerfuseLlavaConfig`)."""

    model_type = "layerfuse_llava_next"
    fusion: dict | None = None


class LayerfuseLlavaOnevisionConfig(LlavaOnevisionConfig):
    """``LlavaOnevisionConfig`` plus ``fusion`` (see `LayerfuseLlavaConfig`)."""

    model_type = "layerfuse_llava_onevision"
    fusion: dict | None = None


def takes_instruction(fusion_config: dict[str, Any]) -> bool:
    """Whether the fusion projector described by ``fusion_config`` needs an instruction embedding (gated IGVA)."""
    fuser = fusion_config["fuser"]
    return fuser["class"] == "InstructionGatedFuser" and bool(fuser["config"].get("gated", True))


def mark_initialized(module: nn.Module) -> nn.Module:
    """Flag ``module`` as initialised so transformers' ``post_init`` keeps the fusers' own initialisation.

    transformers re-initialises every ``nn.Linear`` / ``LayerNorm`` it has not flagged with its own
    scheme, which would undo e.g. a zero-initialised gate head or layer scale.
    """
    for sub in module.modules():
        sub._is_hf_initialized = True
    return module


def _fusion_config(where: str, config: Any) -> dict[str, Any]:
    fusion = getattr(config, "fusion", None)
    if not isinstance(fusion, dict) or not {"fuser", "projector", "layers", "tokens"} <= fusion.keys():
        raise ValueError(
            f"{where}: config.fusion expected the FusionProjector config (a dict with fuser, projector, layers, "
            f"tokens) that fuse_llava stores, got {fusion!r:.200}"
        )
    return fusion


class _FusedImageFeatures:
    """What the three families share: the fused features of a batch of images and the forward that feeds them.

    Mixed into a transformers ``Llava*Model`` (which owns ``vision_tower`` and ``multi_modal_projector``)
    and into its ``*ForConditionalGeneration`` (which reaches them through ``self.model``).
    """

    config: Any

    def _build_fusion(self) -> None:
        fusion = _fusion_config(type(self).__name__, self.config)
        # replaces the stock LlavaMultiModalProjector the parent __init__ built
        self.multi_modal_projector = mark_initialized(FusionProjector.from_config(fusion))
        internal = internal_fusion_config(type(self).__name__, self.config)
        if internal is not None:
            self.internal_fusion = mark_initialized(InternalFusion.from_fusion_config(internal["fusion"]))

    def fused_image_features(self, pixel_values: Tensor, instruction_embeds: Tensor | None = None) -> Tensor:
        """``multi_modal_projector(LayerTap(vision_tower, layers, tokens=tokens)(pixel_values))``.

        See `fused_and_internal_features` for the internal fusion's levels of the same tower forward.

        Args:
            pixel_values: (B, C, H, W) images (anyres crops already flattened into B).
            instruction_embeds: (B, E) instruction embeddings, required by a gated IGVA fuser and
                refused by every other fuser.

        Returns:
            (B, T, D) visual tokens in the projector's dtype.
        """
        return self.fused_and_internal_features(pixel_values, instruction_embeds)[0]

    def fused_and_internal_features(
        self, pixel_values: Tensor, instruction_embeds: Tensor | None = None
    ) -> tuple[Tensor, list[Tensor] | None]:
        """The fusion projector's visual tokens and the internal fusion's levels, from one tower forward.

        The tap holds the projector's layers followed by ``config.internal_fusion["layers"]``; the
        internal levels are their patch tokens (window-ordered for a DeepStack patch merger).

        Returns:
            ``(tokens, levels)``: (B, T, D) as `fused_image_features`, and one (B, N, C) tensor per
            internal level, or ``None`` without an internal fusion.
        """
        where = f"{type(self).__name__}.fused_image_features"
        fusion = _fusion_config(where, self.config)
        if takes_instruction(fusion):
            if instruction_embeds is None:
                raise ValueError(
                    f"{where}: the fuser is a gated InstructionGatedFuser (IGVA) and needs instruction_embeds "
                    "(one embedding per image, (B, E)); see layerfuse.integrations.transformers.InstructionCollator"
                )
        elif instruction_embeds is not None:
            raise ValueError(
                f"{where}: instruction_embeds is only used by a gated InstructionGatedFuser (IGVA); this model's "
                f"fuser is {fusion['fuser']['class']}, so it has no use for them"
            )
        base = self.model if hasattr(self, "lm_head") else self
        internal = internal_fusion_config(where, self.config)
        extra = [] if internal is None else internal["layers"]
        with LayerTap(base.vision_tower, [*fusion["layers"], *extra], tokens=fusion["tokens"]) as tap:
            features = tap(pixel_values)
            num_prefix_tokens = tap.num_prefix_tokens
        levels = None
        if internal is not None:
            count = len(fusion["layers"])
            features, levels = split_internal_levels(
                features, count, fusion["tokens"], num_prefix_tokens, _unwrapped(base.internal_fusion)
            )
        if instruction_embeds is None:
            return base.multi_modal_projector(features), levels
        return base.multi_modal_projector(features, text=instruction_embeds), levels

    def _encode_images(self, kwargs: dict[str, Any], instruction_embeds: Tensor | None) -> dict[str, Any]:
        """Turn ``pixel_values`` (+ ``instruction_embeds``) into ``mm_encoder_outputs`` before the parent forward.

        ``generate`` does the same once before prefill (through ``get_image_features``), so the fusion
        runs once per prompt and never during the cached decoding steps.
        """
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            if instruction_embeds is not None:
                raise ValueError(
                    f"{type(self).__name__}.forward: instruction_embeds was given without pixel_values; the "
                    "instruction only conditions the image features, computed from pixel_values at prefill"
                )
            return kwargs
        if kwargs.get("mm_encoder_outputs") is not None:
            raise ValueError(f"{type(self).__name__}.forward: pass pixel_values or mm_encoder_outputs, not both")
        image_kwargs = {k: kwargs[k] for k in self._image_feature_args if kwargs.get(k) is not None}
        kwargs["mm_encoder_outputs"] = {
            "image": self.get_image_features(
                pixel_values=pixel_values, instruction_embeds=instruction_embeds, **image_kwargs
            )
        }
        kwargs["pixel_values"] = None
        return kwargs

    def _run_parent(self, parent_forward: Any, kwargs: dict[str, Any]) -> Any:
        return parent_forward(self, **kwargs)

    _image_feature_args: tuple[str, ...] = ()


def _unwrapped(holder: nn.Module) -> InternalFusion:
    """The internal fusion's architecture (shared by PEFT's copies): ``holder`` or the wrapper's original."""
    return holder if isinstance(holder, InternalFusion) else holder.original_module


def _forward_with_instruction(parent: type) -> Any:
    """``parent.forward`` plus a keyword ``instruction_embeds``, with the parent's signature.

    ``generate`` checks its keyword arguments against the signature of ``forward`` and encodes the images
    before prefill through ``get_image_features``, so the signature must name every parent argument.
    """
    parent_forward = parent.forward
    signature = inspect.signature(parent_forward)
    names = [n for n, p in signature.parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD][1:]

    def forward(self: Any, *args: Any, instruction_embeds: Tensor | None = None, **kwargs: Any) -> Any:
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__}.forward: expected at most {len(names)} positional arguments")
        kwargs.update(zip(names, args))
        return self._run_parent(parent_forward, self._encode_images(kwargs, instruction_embeds))

    params = list(signature.parameters.values())
    extra = inspect.Parameter("instruction_embeds", inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
    forward.__signature__ = signature.replace(parameters=[*params[:at], extra, *params[at:]])  # type: ignore[attr-defined]
    forward.__doc__ = (
        f"``{parent.__name__}.forward``; ``instruction_embeds`` (num_images, E) conditions an IGVA fuser."
    )
    return forward


def _repeat_per_crop(embeds: Tensor | None, crops: list[int]) -> Tensor | None:
    if embeds is None:
        return None
    if embeds.ndim != 2 or embeds.shape[0] != len(crops):
        raise ValueError(
            f"instruction_embeds expected one row per image, shape ({len(crops)}, E), got {tuple(embeds.shape)}"
        )
    return embeds.repeat_interleave(torch.as_tensor(crops, device=embeds.device), dim=0)


def _check_grid_tokens(where: str, features: Tensor, config: Any) -> None:
    side = config.vision_config.image_size // config.vision_config.patch_size
    if features.shape[1] != side * side:
        raise ValueError(
            f"{where}: anyres packing lays each crop's tokens out on the {side}x{side} patch grid, but the fusion "
            f"projector returns {features.shape[1]} tokens per crop; use a fuser that keeps one token per patch "
            "(not token concatenation)"
        )


# ---------------------------------------------------------------- LLaVA-1.5


class LayerfuseLlavaModel(_FusedImageFeatures, LlavaModel):
    """``LlavaModel`` whose image features come from a layerfuse fusion projector."""

    config_class = LayerfuseLlavaConfig
    config: LayerfuseLlavaConfig
    _image_feature_args = ("image_sizes",)

    def __init__(self, config: LayerfuseLlavaConfig) -> None:
        super().__init__(config)
        self._build_fusion()

    def get_image_features(
        self,
        pixel_values: Tensor,
        instruction_embeds: Tensor | None = None,
        image_sizes: Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        """``pooler_output``: one (T, D) tensor per image; ``vision_feature_layer`` and the select strategy are ignored."""
        if image_sizes is not None:
            raise ValueError(
                f"{type(self).__name__}.get_image_features: image_sizes (variable-size Pixtral images) is not "
                "supported with a fusion projector; pass fixed-size images"
            )
        features, levels = self.fused_and_internal_features(pixel_values, instruction_embeds)
        # the internal fusion's levels travel with the image features (generate encodes before prefill)
        return BaseModelOutputWithPooling(
            pooler_output=list(features), hidden_states=None if levels is None else tuple(levels)
        )

    forward = _forward_with_instruction(LlavaModel)

    # generate sets this: an internal fusion then keeps the prefill's levels for the cached decoding
    # steps (I_M's cross-attention reads them at every step; I_D and DeepStack add them at prefill only)
    _generating = False

    def _run_parent(self, parent_forward: Any, kwargs: dict[str, Any]) -> Any:
        holder = getattr(self, "internal_fusion", None)
        if holder is None:
            return parent_forward(self, **kwargs)
        fusion = active_internal_fusion(holder, self.language_model)
        image = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if image is not None:
            levels = getattr(image, "hidden_states", None)
            if levels is None:
                raise ValueError(
                    f"{type(self).__name__}.forward: mm_encoder_outputs['image'] lacks the internal fusion's levels "
                    "(hidden_states); compute it with get_image_features of this model"
                )
            if len(image.pooler_output) != levels[0].shape[0]:
                # generate's expansion (num_beams, num_return_sequences > 1) repeats only pooler_output
                raise ValueError(
                    f"{type(self).__name__}.forward: the image features hold {len(image.pooler_output)} images but "
                    f"the internal fusion's levels {levels[0].shape[0]}; generate with num_beams or "
                    "num_return_sequences > 1 is not supported with an internal fusion (repeat the batch instead)"
                )
            mask = image_token_mask(self, kwargs.get("input_ids"), kwargs.get("inputs_embeds"))
            fusion.set_inputs(list(levels), mask)
        elif not self._generating:
            fusion.clear_inputs()
        try:
            return parent_forward(self, **kwargs)
        finally:
            if not self._generating:
                fusion.clear_inputs()


class LayerfuseLlavaForConditionalGeneration(_FusedImageFeatures, LlavaForConditionalGeneration):
    """``LlavaForConditionalGeneration`` with a layerfuse fusion projector; build one with ``fuse_llava``.

    ``forward`` and ``generate`` take ``instruction_embeds`` (num_images, E) for an IGVA fuser.
    """

    config_class = LayerfuseLlavaConfig
    config: LayerfuseLlavaConfig
    _image_feature_args = ("image_sizes",)

    def __init__(self, config: LayerfuseLlavaConfig) -> None:
        super().__init__(config)
        self.model = LayerfuseLlavaModel(config)
        self.post_init()

    def get_image_features(
        self, pixel_values: Tensor, instruction_embeds: Tensor | None = None, **kwargs: Any
    ) -> BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values, instruction_embeds, **kwargs)

    forward = _forward_with_instruction(LlavaForConditionalGeneration)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``LlavaForConditionalGeneration.generate``; an internal fusion gets the prefill's levels."""
        if getattr(self.model, "internal_fusion", None) is None:
            return super().generate(*args, **kwargs)
        self.model._generating = True
        try:
            return super().generate(*args, **kwargs)
        finally:
            self.model._generating = False
            for module in self.model.internal_fusion.modules():
                if isinstance(module, InternalFusion):
                    module.clear_inputs()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        return _load_checked(super().from_pretrained, cls, args, kwargs)


# ---------------------------------------------------------------- LLaVA-NeXT (anyres)


class LayerfuseLlavaNextModel(_FusedImageFeatures, LlavaNextModel):
    """``LlavaNextModel`` whose every anyres crop goes through the tap and the fusion projector."""

    config_class = LayerfuseLlavaNextConfig
    config: LayerfuseLlavaNextConfig
    _image_feature_args = ("image_sizes",)

    def __init__(self, config: LayerfuseLlavaNextConfig) -> None:
        super().__init__(config)
        self._build_fusion()

    def crop_counts(self, image_sizes: Tensor) -> list[int]:
        """Crops per image (base image + anyres tiles) for (num_images, 2) ``image_sizes`` (H, W)."""
        return [
            image_size_to_num_patches(
                image_size=size,
                grid_pinpoints=self.config.image_grid_pinpoints,
                patch_size=self.config.vision_config.image_size,
            )
            for size in image_sizes
        ]

    def get_image_features(
        self,
        pixel_values: Tensor,
        image_sizes: Tensor,
        instruction_embeds: Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        """``pooler_output``: one packed (T_i, D) tensor per image (crops unpadded, newline tokens added)."""
        where = f"{type(self).__name__}.get_image_features"
        crops = self.crop_counts(image_sizes)
        pixel_values = _flatten_crops(where, pixel_values, crops)
        features = self.fused_image_features(pixel_values, _repeat_per_crop(instruction_embeds, crops))
        _check_grid_tokens(where, features, self.config)
        packed, _ = self.pack_image_features(
            torch.split(features, crops, dim=0),
            image_sizes,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            image_newline=self.image_newline,
        )
        return BaseModelOutputWithPooling(pooler_output=packed)

    forward = _forward_with_instruction(LlavaNextModel)


class LayerfuseLlavaNextForConditionalGeneration(_FusedImageFeatures, LlavaNextForConditionalGeneration):
    """``LlavaNextForConditionalGeneration`` with a layerfuse fusion projector; build one with ``fuse_llava``."""

    config_class = LayerfuseLlavaNextConfig
    config: LayerfuseLlavaNextConfig
    _image_feature_args = ("image_sizes",)

    def __init__(self, config: LayerfuseLlavaNextConfig) -> None:
        super().__init__(config)
        self.model = LayerfuseLlavaNextModel(config)
        self.post_init()

    def get_image_features(
        self, pixel_values: Tensor, image_sizes: Tensor, instruction_embeds: Tensor | None = None, **kwargs: Any
    ) -> BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values, image_sizes, instruction_embeds, **kwargs)

    forward = _forward_with_instruction(LlavaNextForConditionalGeneration)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        return _load_checked(super().from_pretrained, cls, args, kwargs)


# ---------------------------------------------------------------- LLaVA-OneVision


class LayerfuseLlavaOnevisionModel(_FusedImageFeatures, LlavaOnevisionModel):
    """``LlavaOnevisionModel`` whose anyres crops and video frames go through the tap and the fusion projector."""

    config_class = LayerfuseLlavaOnevisionConfig
    config: LayerfuseLlavaOnevisionConfig
    _image_feature_args = ("image_sizes", "vision_aspect_ratio", "batch_num_images")

    def __init__(self, config: LayerfuseLlavaOnevisionConfig) -> None:
        super().__init__(config)
        self._build_fusion()

    def get_image_features(
        self,
        pixel_values: Tensor,
        image_sizes: Tensor,
        instruction_embeds: Tensor | None = None,
        vision_aspect_ratio: str | None = None,
        batch_num_images: Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        """``pooler_output``: one packed (T_i, D) tensor per image, as ``LlavaOnevisionModel`` packs them."""
        where = f"{type(self).__name__}.get_image_features"
        if batch_num_images is None:
            patched = [True] * len(image_sizes)
        else:
            patched = [n == 1 for n in batch_num_images for _ in range(n)]
        crops = [
            image_size_to_num_patches(
                image_size=size,
                grid_pinpoints=self.config.image_grid_pinpoints,
                patch_size=self.config.vision_config.image_size,
            )
            if anyres
            else 1
            for size, anyres in zip(image_sizes, patched)
        ]
        pixel_values = _flatten_crops(where, pixel_values, crops)
        features = self.fused_image_features(pixel_values, _repeat_per_crop(instruction_embeds, crops))
        _check_grid_tokens(where, features, self.config)
        packed, _ = self.pack_image_features(
            torch.split(features, crops, dim=0),
            image_sizes,
            image_newline=self.image_newline,
            vision_aspect_ratio=vision_aspect_ratio or self.config.vision_aspect_ratio,
        )
        return BaseModelOutputWithPooling(pooler_output=packed)

    def get_video_features(self, pixel_values_videos: Tensor, **kwargs: Any) -> BaseModelOutputWithPooling:
        """Every frame through the tap and the fusion projector, then OneVision's 2x2 pooling and newline."""
        where = f"{type(self).__name__}.get_video_features"
        if pixel_values_videos.ndim != 5:
            raise ValueError(
                f"{where}: pixel_values_videos expected (B, frames, C, H, W), got {tuple(pixel_values_videos.shape)}"
            )
        if takes_instruction(_fusion_config(where, self.config)):
            raise ValueError(f"{where}: an IGVA fuser needs one instruction per image; videos are not supported")
        batch, frames = pixel_values_videos.shape[:2]
        features = self.fused_image_features(pixel_values_videos.flatten(0, 1))
        _check_grid_tokens(where, features, self.config)
        features = self.apply_pooling(features)
        features = features.reshape(batch, frames * features.shape[1], -1)
        newline = self.image_newline[None, None, :].repeat(batch, 1, 1).to(features.device, features.dtype)
        return BaseModelOutputWithPooling(pooler_output=torch.cat((features, newline), dim=1))

    forward = _forward_with_instruction(LlavaOnevisionModel)


class LayerfuseLlavaOnevisionForConditionalGeneration(_FusedImageFeatures, LlavaOnevisionForConditionalGeneration):
    """``LlavaOnevisionForConditionalGeneration`` with a layerfuse fusion projector; build one with ``fuse_llava``."""

    config_class = LayerfuseLlavaOnevisionConfig
    config: LayerfuseLlavaOnevisionConfig
    _image_feature_args = ("image_sizes", "vision_aspect_ratio", "batch_num_images")

    def __init__(self, config: LayerfuseLlavaOnevisionConfig) -> None:
        super().__init__(config)
        self.model = LayerfuseLlavaOnevisionModel(config)
        self.post_init()

    def get_image_features(
        self, pixel_values: Tensor, image_sizes: Tensor, instruction_embeds: Tensor | None = None, **kwargs: Any
    ) -> BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values, image_sizes, instruction_embeds, **kwargs)

    def get_video_features(self, pixel_values_videos: Tensor, **kwargs: Any) -> BaseModelOutputWithPooling:
        return self.model.get_video_features(pixel_values_videos, **kwargs)

    forward = _forward_with_instruction(LlavaOnevisionForConditionalGeneration)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        return _load_checked(super().from_pretrained, cls, args, kwargs)


def _flatten_crops(where: str, pixel_values: Tensor, crops: list[int]) -> Tensor:
    if pixel_values.ndim == 5:
        if pixel_values.shape[0] != len(crops):
            raise ValueError(
                f"{where}: pixel_values has {pixel_values.shape[0]} images but image_sizes has {len(crops)}"
            )
        return torch.cat([pix[:n] for pix, n in zip(pixel_values, crops)], dim=0)
    if pixel_values.ndim != 4 or pixel_values.shape[0] != sum(crops):
        raise ValueError(
            f"{where}: pixel_values expected (num_images, crops, C, H, W) or ({sum(crops)}, C, H, W) for crops "
            f"{crops}, got {tuple(pixel_values.shape)}"
        )
    return pixel_values


def _load_checked(load: Any, cls: type, args: tuple, kwargs: dict[str, Any]) -> Any:
    """``from_pretrained`` that refuses a checkpoint whose fusion weights are missing or misshaped.

    transformers initialises missing weights at random and only logs it; a fusion projector left at
    random would silently ruin every image, so its keys must all be in the checkpoint.
    """
    want_info = kwargs.pop("output_loading_info", False)
    model, info = load(*args, output_loading_info=True, **kwargs)
    fusion_keys = ("multi_modal_projector.", "internal_fusion.")
    bad = [k for k in info.get("missing_keys", ()) if any(f in k for f in fusion_keys)]
    bad += [str(k) for k in info.get("mismatched_keys", ()) if any(f in str(k) for f in fusion_keys)]
    if bad:
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        raise ValueError(
            f"{cls.__name__}.from_pretrained({str(source)!r}): the checkpoint lacks or misshapes fusion projector "
            f"weights ({len(bad)}): {', '.join(sorted(bad)[:8])}{' ...' if len(bad) > 8 else ''}; refusing to "
            "start from a randomly initialised fuser"
        )
    return (model, info) if want_info else model


# config class -> (base model class, generation model class)
FUSED_MODEL_TYPES: dict[type, tuple[type, type]] = {
    LayerfuseLlavaConfig: (LayerfuseLlavaModel, LayerfuseLlavaForConditionalGeneration),
    LayerfuseLlavaNextConfig: (LayerfuseLlavaNextModel, LayerfuseLlavaNextForConditionalGeneration),
    LayerfuseLlavaOnevisionConfig: (LayerfuseLlavaOnevisionModel, LayerfuseLlavaOnevisionForConditionalGeneration),
}


def register_auto_classes() -> None:
    """Register the configs with ``AutoConfig`` and the models with ``AutoModel`` / ``AutoModelForImageTextToText``.

    Idempotent; runs when `layerfuse.integrations.transformers` is imported (and when transformers is
    imported after layerfuse), so ``AutoModelForImageTextToText.from_pretrained(dir)`` loads a fused model.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    for config_cls, (base_cls, lm_cls) in FUSED_MODEL_TYPES.items():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModel.register(config_cls, base_cls, exist_ok=True)
        AutoModelForImageTextToText.register(config_cls, lm_cls, exist_ok=True)
