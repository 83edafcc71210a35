"""Layer taps: pull chosen hidden states out of timm, Hugging Face and open_clip ViTs."""

from .backbones import Backbone, find_backbone
from .tap import LayerTap

__all__ = ["Backbone", "LayerTap", "find_backbone"]
