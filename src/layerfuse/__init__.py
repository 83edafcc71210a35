"""layerfuse: fuse features from several layers of a vision transformer for multimodal LLMs.

Optional dependencies (timm, transformers, open_clip, xformers, triton, matplotlib, tqdm,
safetensors) are imported only by the features that need them.
"""

from ._version import __version__
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

from .integrations._autoregister import install as _install_auto_classes

# fused LLaVA checkpoints load through transformers' Auto classes once layerfuse is imported
_install_auto_classes()
