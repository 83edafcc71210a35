"""Layerfuse fusion projectors inside Hugging Face LLaVA models (needs the ``hf`` extra)."""

import inspect

from ..._optional import require

_transformers = require("transformers", extra="hf", purpose="layerfuse.integrations.transformers")
# the fused models hand the image features to the stock forward through `mm_encoder_outputs`
if "mm_encoder_outputs" not in inspect.signature(_transformers.LlavaForConditionalGeneration.forward).parameters:
    raise ImportError(
        "layerfuse.integrations.transformers needs a transformers whose LLaVA forward takes mm_encoder_outputs "
        f"(transformers 5, tested with 5.24); installed: {_transformers.__version__}"
    )

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
