"""Layerfuse fusion projectors inside Hugging Face LLaVA models (needs ``pip install 'layerfuse[hf]'``)."""

from ..._optional import require

require("transformers", extra="hf", purpose="layerfuse.integrations.transformers")

from .collator import InstructionCollator, user_turn  # noqa: E402
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
from .training import FUSION_MODULES, fusion_parameters, llm_linear_names, set_training_stage  # noqa: E402

register_auto_classes()

__all__ = [
    "FUSION_MODULES",
    "InstructionCollator",
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
    "fusion_parameters",
    "llm_linear_names",
    "register_auto_classes",
    "set_training_stage",
    "user_turn",
]
