"""layerfuse: fuse features from several layers of a vision transformer for multimodal LLMs."""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

# Public name -> defining module. Resolved on first access so `import layerfuse` stays cheap and
# optional dependencies are imported only by the features that need them.
_EXPORTS: dict[str, str] = {
    "LayerTap": "layerfuse.taps",
    "LayerFeatures": "layerfuse.features",
    "Fuser": "layerfuse.fusers",
    "FusionProjector": "layerfuse.fusers",
    "ConcatFuser": "layerfuse.fusers",
    "TokenConcatFuser": "layerfuse.fusers",
    "WeightedSumFuser": "layerfuse.fusers",
    "MMFuser": "layerfuse.fusers",
    "CrossAttentionFuser": "layerfuse.fusers",
    "InstructionGatedFuser": "layerfuse.fusers",
    "Projector": "layerfuse.layers",
    "build_projector": "layerfuse.layers",
    "from_official": "layerfuse.convert",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'layerfuse' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
