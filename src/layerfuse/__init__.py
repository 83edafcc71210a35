"""layerfuse: fuse features from several layers of a vision transformer for multimodal LLMs.

Optional dependencies (timm, transformers, open_clip, xformers, triton, matplotlib, tqdm,
safetensors) are imported only by the features that need them. The names below are imported on
first use, so ``import layerfuse`` (and ``layerfuse --version`` / ``--help``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .integrations._autoregister import install as _install_auto_classes

if TYPE_CHECKING:  # what static tools (type checkers, the API docs) read; at run time see __getattr__
    from .convert import from_official
    from .features import LayerFeatures
    from .fusers import (
        ConcatFuser,
        CrossAttentionFuser,
        Fuser,
        FusionProjector,
        InstructionGatedFuser,
        MMFuser,
        TokenConcatFuser,
        WeightedSumFuser,
    )
    from .layers import Projector, build_projector
    from .taps import LayerTap

# public name -> submodule that defines it
_EXPORTS = {
    "ConcatFuser": ".fusers",
    "CrossAttentionFuser": ".fusers",
    "Fuser": ".fusers",
    "FusionProjector": ".fusers",
    "InstructionGatedFuser": ".fusers",
    "LayerFeatures": ".features",
    "LayerTap": ".taps",
    "MMFuser": ".fusers",
    "Projector": ".layers",
    "TokenConcatFuser": ".fusers",
    "WeightedSumFuser": ".fusers",
    "build_projector": ".layers",
    "from_official": ".convert",
}

__all__ = [
    "ConcatFuser",
    "CrossAttentionFuser",
    "Fuser",
    "FusionProjector",
    "InstructionGatedFuser",
    "LayerFeatures",
    "LayerTap",
    "MMFuser",
    "Projector",
    "TokenConcatFuser",
    "WeightedSumFuser",
    "__version__",
    "build_projector",
    "from_official",
]


# fused LLaVA checkpoints load through transformers' Auto classes once layerfuse is imported (registered
# when transformers is imported, so this import stays free of torch and transformers)
_install_auto_classes()


def __getattr__(name: str) -> Any:
    # PEP 562: import the defining submodule on first access and cache the name here.
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f".{name}", __name__)  # layerfuse.fusers etc. after `import layerfuse`
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
