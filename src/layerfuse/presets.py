"""Published layer-fusion configurations by name: which hidden states to tap and the fuser to build.

The catalogue itself (the presets, their rules at other depths and the depths they refuse) is
`layerfuse.preset_plans`, data that imports no fuser; this module adds the
factories that build any kind of fuser from it, above both the fusers and the catalogue. A preset is
always made for a stated depth, or for the depth of the tower it is given; there is no default.

Examples:
    >>> preset_layers("lin_ed_3_18_23", depth=24)
    (3, 18, 23)
    >>> fuser = build_fuser("lin_ed_3_18_23", dim=1024, depth=24)   # a ConcatFuser
    >>> fuser.layers, fuser.tokens, fuser.out_dim
    ((3, 18, 23), 'patch', 3072)
    >>> module = build_fusion_projector("dense_connector_dci", dim=1024, llm_dim=4096, depth=24)
    >>> module.layers[:3], module.tokens
    ((0, 1, 2), 'patch')

With a tower (`vit` any model [`LayerTap`][layerfuse.LayerTap] accepts) the depth comes from it:

```python
module = build_fusion_projector("dense_connector_dci", dim=1024, llm_dim=4096, tower=vit)
visual_tokens = module(LayerTap(vit, module.layers, tokens=module.tokens)(images))
```
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

from .fusers.base import Fuser
from .fusers.pipeline import FusionProjector
from .preset_plans import PRESETS, PresetPlan, preset_layers, preset_names, preset_plan

__all__ = [
    "PRESETS",
    "PresetPlan",
    "build_fuser",
    "build_fusion_projector",
    "preset_layers",
    "preset_names",
    "preset_plan",
]

F = TypeVar("F", bound=Fuser)


def build_fuser(
    name: str,
    *,
    dim: int,
    depth: int | None = None,
    tower: nn.Module | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Fuser:
    """The fuser of preset `name` (any kind) for inputs of width `dim` from a `depth`-block backbone.

    The same as [`Fuser.from_preset`][layerfuse.Fuser.from_preset]; the result carries the preset's
    `layers` (what to tap), `tokens` (the tap's token mode) and `preset` (the plan).

    Args:
        name: a preset name ([`preset_names`][layerfuse.presets.preset_names]).
        dim: ViT width C.
        depth: number of transformer blocks of the backbone. Required unless `tower` is given.
        tower: the vision tower or its [`LayerTap`][layerfuse.LayerTap]; its depth is used.
        device: where to build the parameters. Default: the default device.
        dtype: parameter dtype. Default: the default dtype.

    Returns:
        The fuser.

    Raises:
        ValueError: unknown name, or a depth at which the preset degenerates
            ([`preset_plan`][layerfuse.presets.preset_plan]).
        TypeError: no `depth` and no `tower`.
    """
    return Fuser.from_preset(name, dim, depth, tower=tower, device=device, dtype=dtype)


def build_fusion_projector(
    name: str,
    *,
    dim: int,
    llm_dim: int,
    depth: int | None = None,
    tower: nn.Module | None = None,
    projector: str = "mlp2x_gelu",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> FusionProjector:
    """Preset fuser + LLaVA projector, with the `layers`/`tokens` that feed it.

    The same as [`FusionProjector.from_preset`][layerfuse.FusionProjector.from_preset].

    Args:
        name: a preset name ([`preset_names`][layerfuse.presets.preset_names]).
        dim: ViT width C.
        llm_dim: LLM hidden size.
        depth: number of transformer blocks of the backbone. Required unless `tower` is given.
        tower: the vision tower or its [`LayerTap`][layerfuse.LayerTap]; its depth is used.
        projector: LLaVA `mm_projector_type`. Default: `"mlp2x_gelu"`
        device: where to build the parameters. Default: the default device.
        dtype: parameter dtype. Default: the default dtype.

    Returns:
        The module; `module.layers` and `module.tokens` say what to tap.

    Raises:
        ValueError: unknown name, or a depth at which the preset degenerates.
        TypeError: no `depth` and no `tower`.
    """
    return FusionProjector.from_preset(
        name, dim=dim, llm_dim=llm_dim, depth=depth, tower=tower, projector=projector, device=device, dtype=dtype
    )


