"""Layerfuse fusion projectors inside Hugging Face LLaVA models (needs ``pip install 'layerfuse[hf]'``)."""

from ..._optional import require

require("transformers", extra="hf", purpose="layerfuse.integrations.transformers")

from .fuse import fuse_llava  # noqa: E402
from .modeling import (  # noqa: E402
    LayerfuseLlavaConfig,
    LayerfuseLlavaForConditionalGeneration,
    LayerfuseLlavaModel,
    LayerfuseLlavaNextConfig,
    LayerfuseLlavaNextForConditionalGeneration,
    LayerfuseLlavaNextModel,
    LayerfuseLlavaOnevisionConfig,
    LayerfuseLlavaOnevisionForConditionalGeneration,
    LayerfuseLlavaOnevisionModel,
    register_auto_classes,
)

register_auto_classes()

__all__ = [
    "LayerfuseLlavaConfig",
    "LayerfuseLlavaForConditionalGeneration",
    "LayerfuseLlavaModel",
    "LayerfuseLlavaNextConfig",
    "LayerfuseLlavaNextForConditionalGeneration",
    "LayerfuseLlavaNextModel",
    "LayerfuseLlavaOnevisionConfig",
    "LayerfuseLlavaOnevisionForConditionalGeneration",
    "LayerfuseLlavaOnevisionModel",
    "fuse_llava",
    "register_auto_classes",
]
