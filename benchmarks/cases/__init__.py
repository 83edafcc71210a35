"""Fuser benchmark cases, one module per fuser family; ``benchmarks/fusers.py`` runs them all."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["BASELINE", "LLAVA15", "FuserCase", "all_cases", "llava_features"]

# The case every other is compared with: LLaVA-1.5's projector on its single layer (cases/concat.py).
BASELINE = "llava15_single_layer"

# LLaVA-1.5 scale: CLIP-L/14-336 (24x24 patches, width 1024) into a 7B LLM (hidden 4096).
LLAVA15 = {"grid": (24, 24), "dim": 1024, "llm": 4096, "batch": 2}
QUICK = {"grid": (4, 5), "dim": 32, "llm": 48, "batch": 2}


@dataclass
class FuserCase:
    """A fuser (with its projector) built at benchmark scale.

    ``build(device, dtype, quick)`` returns ``(module, features, kwargs)``: calling
    ``module(features, **kwargs)`` is the measured forward. ``quick`` asks for tiny shapes.
    """

    name: str
    build: Callable[[torch.device, torch.dtype, bool], tuple[nn.Module, list[Tensor], dict[str, Any]]]


def llava_features(
    num_layers: int, *, device: torch.device, dtype: torch.dtype, quick: bool, tokens_extra: int = 0
) -> tuple[list[Tensor], dict[str, Any]]:
    """Random per-layer patch features at LLaVA-1.5 scale (or tiny when ``quick``) and the scale used."""
    scale = QUICK if quick else LLAVA15
    gh, gw = scale["grid"]
    feats = [
        torch.randn(scale["batch"], gh * gw + tokens_extra, scale["dim"], device=device, dtype=dtype)
        for _ in range(num_layers)
    ]
    return feats, scale


def all_cases() -> list[FuserCase]:
    cases: list[FuserCase] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        cases.extend(importlib.import_module(f"{__name__}.{info.name}").CASES)
    return cases
