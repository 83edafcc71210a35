"""Reusable building blocks of the fusers."""

from .layer_scale import LayerScale
from .projector import Projector, build_projector

__all__ = ["LayerScale", "Projector", "build_projector"]
