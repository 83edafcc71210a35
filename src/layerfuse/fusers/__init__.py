"""Fusers: modules that combine per-layer ViT features into one sequence of visual tokens."""

from .base import Fuser
from .pipeline import FusionProjector

__all__ = ["Fuser", "FusionProjector"]
