"""Published layer-fusion configurations by name: which hidden states to tap and the fuser to build.

Every preset is a function of the backbone depth D (number of transformer blocks; hidden-state
indices 0..D, index 0 = embedding output, k = output of block k, the convention of
[`LayerTap`][layerfuse.LayerTap] and HF ``hidden_states``). At D = 24 (CLIP ViT-L/14-336) the layers are
exactly the authors'. For other depths each preset states its rule; the ones used here are

- ``scale(k) = floor(k * D / 24)``: a layer chosen on the 24-block CLIP-L is mapped proportionally,
  Lin et al.'s own rule for SigLIP (``3-18-23`` -> ``3, 20, 25`` at D = 27);
- Dense Connector keeps its indices 7 and 15 for D >= 24 (as the authors do on SigLIP) and scales
  them below;
- "penultimate" is D - 1 (LLaVA's ``-2``);
- halves: ``n = D // 2``.

SigLIP-so400m has D = 27 and no CLS token; the presets give indices of the full 27-block model,
which equal those of the 26-block truncated tower used by LLaVA-NeXT, Dense Connector and Lin et al.
for every index up to 26. Presets feed patch tokens (``tokens="patch"``), which for a tower without
CLS keeps every token.

```python
layers = preset_layers("lin_ed_3_18_23", depth=24)           # (3, 18, 23)
fuser = build_fuser("lin_ed_3_18_23", dim=1024, depth=24)    # ConcatFuser, out_dim 3072
module = build_fusion_projector("dense_connector_dci", dim=1024, llm_dim=4096)
visual_tokens = module(LayerTap(vit, module.layers, tokens=module.tokens)(images))
```
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from ._checks import check_positive_int
from .fusers.base import Fuser
from .fusers.concat import ConcatFuser
from .fusers.pipeline import FusionProjector
from .fusers.token_concat import TokenConcatFuser
from .fusers.weighted_sum import WeightedSumFuser
from .layers.projector import Projector

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


@dataclass(frozen=True)
class PresetPlan:
    """What a preset resolves to for one depth.

    Attributes:
        layers: hidden-state indices to tap, in the fuser's input order.
        fuser: the fuser class.
        options: constructor keyword arguments besides the widths, inputs and factory kwargs.
        tokens: the tap's token mode.
    """

    layers: tuple[int, ...]
    fuser: type[Fuser]
    options: dict[str, Any] = field(default_factory=dict)
    tokens: str = "patch"

    def build(
        self, dim: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Fuser:
        """The fuser for inputs of width ``dim``."""
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        if self.fuser is ConcatFuser:
            return ConcatFuser([dim] * len(self.layers), **self.options, **dd)
        return self.fuser(dim, len(self.layers), **self.options, **dd)  # type: ignore[call-arg]

    @classmethod
    def concat(cls, groups: Sequence[int | Sequence[int]], **options: Any) -> PresetPlan:
        """A [`ConcatFuser`][layerfuse.ConcatFuser] plan from channel blocks named by hidden-state index.

        Each entry of ``groups`` is a hidden-state index or a sequence of them to average. Each layer
        is tapped once, even if used twice (Dense Connector DCI's base inside its second group): in
        block order for plain layers, in ascending order when there are group means (so the inputs
        of DCI on CLIP-L are hidden states 0..23 and its terms read ``[23, 0..11, 12..23]``).
        """
        layers: list[int] = []
        for g in groups:
            layers.extend(k for k in ((g,) if isinstance(g, int) else g) if k not in layers)
        if not all(isinstance(g, int) for g in groups):
            layers.sort()
        pos = {layer: i for i, layer in enumerate(layers)}
        terms = [pos[g] if isinstance(g, int) else [pos[k] for k in g] for g in groups]
        return cls(tuple(layers), ConcatFuser, {"terms": terms, **options})


PRESETS: dict[str, Callable[[int], PresetPlan]] = {}


def _preset(name: str) -> Callable[[Callable[[int], PresetPlan]], Callable[[int], PresetPlan]]:
    def register(fn: Callable[[int], PresetPlan]) -> Callable[[int], PresetPlan]:
        PRESETS[name] = fn
        return fn

    return register


def _scale(k: int, depth: int) -> int:
    return k * depth // 24


def _keep(k: int, depth: int) -> int:
    # Dense Connector keeps its CLIP-L indices on the deeper SigLIP tower; shallower backbones scale down
    return k if depth >= 24 else _scale(k, depth)


@_preset("llava")
def llava(depth: int) -> PresetPlan:
    """LLaVA-1.5's single penultimate layer, ``[D - 1]`` (Liu et al., "Improved Baselines with Visual
    Instruction Tuning", CVPR 2024). The baseline the fusion presets are compared with."""
    return PresetPlan.concat([depth - 1])


@_preset("dense_connector_sti")
def dense_connector_sti(depth: int) -> PresetPlan:
    """Dense Connector STI (Yao et al., "Dense Connector for MLLMs", NeurIPS 2024): tokens of the
    penultimate layer followed by 1-D pool-8 tokens of layers 7 and 15. The authors keep 7 and 15 on
    the deeper SigLIP tower, so they are kept for D >= 24 and scaled (``scale(k)``) below; the base is
    D - 1."""
    return PresetPlan((depth - 1, _keep(7, depth), _keep(15, depth)), TokenConcatFuser, {"pool": "1d", "window": 8})


@_preset("dense_connector_sci")
def dense_connector_sci(depth: int) -> PresetPlan:
    """Dense Connector SCI (Yao et al., NeurIPS 2024): channels ``[L_{D-1}; L_7; L_15]`` (7 and 15 kept
    for D >= 24 as the authors do for SigLIP, ``scale(k)`` below)."""
    return PresetPlan.concat([depth - 1, _keep(7, depth), _keep(15, depth)])


@_preset("dense_connector_dci")
def dense_connector_dci(depth: int) -> PresetPlan:
    """Dense Connector DCI (Yao et al., NeurIPS 2024): channels ``[L_{D-1}; mean(L_0..L_{n-1});
    mean(L_n..L_{2n-1})]`` with n = D // 2, the code's index ranges (0..11 / 12..23 at D = 24, the
    second group containing the base again; 0..12 / 13..25 with base 26 at D = 27, the authors'
    SigLIP values)."""
    n = depth // 2
    g1, g2 = list(range(0, n)), list(range(n, 2 * n))
    return PresetPlan.concat([depth - 1, g1, g2])


@_preset("lin_ed_18")
def lin_ed_18(depth: int) -> PresetPlan:
    """Lin et al. external-direct ``"18"`` (Lin et al., "Multi-Layer Visual Feature Fusion in MLLMs",
    CVPR 2025): channels ``[L_18; L_23]``, final layer last; ``scale(k)`` at other depths."""
    layers = [_scale(18, depth), _scale(23, depth)]
    return PresetPlan.concat(layers)


@_preset("lin_ed_3_18_23")
def lin_ed_3_18_23(depth: int) -> PresetPlan:
    """Lin et al. external-direct ``"3-18-23"`` (CVPR 2025): channels ``[L_3; L_18; L_23]``;
    ``scale(k)`` at other depths (``[3, 20, 25]`` at D = 27, as the authors do for SigLIP)."""
    layers = [_scale(3, depth), _scale(18, depth), _scale(23, depth)]
    return PresetPlan.concat(layers)


@_preset("look_shallower")
def look_shallower(depth: int) -> PresetPlan:
    """The 3-18-23 fusion of Chen, Lin et al., "Multimodal Language Models See Better When They Look
    Shallower" (EMNLP 2025): one shallow, one middle and one deep layer, ``[L_3; L_18; L_23]``
    (the same model as ``lin_ed_3_18_23``); pair it with a ``linear`` or ``mlp2x_gelu`` projector."""
    return lin_ed_3_18_23(depth)


@_preset("lin_ed_former")
def lin_ed_former(depth: int) -> PresetPlan:
    """Lin et al. external-direct ``"former"`` (CVPR 2025): ``[mean(L_1..L_n); L_23]``, n = D // 2,
    final layer ``scale(23)``."""
    n, final = depth // 2, _scale(23, depth)
    group = list(range(1, n + 1))
    return PresetPlan.concat([group, final])


@_preset("lin_ed_latter")
def lin_ed_latter(depth: int) -> PresetPlan:
    """Lin et al. external-direct ``"latter"`` (CVPR 2025): ``[mean(L_{D-n+1}..L_D); L_23]``,
    n = D // 2 (13..24 at D = 24; the group contains the final layer again)."""
    n, final = depth // 2, _scale(23, depth)
    group = list(range(depth - n + 1, depth + 1))
    return PresetPlan.concat([group, final])


@_preset("lin_ed_all")
def lin_ed_all(depth: int) -> PresetPlan:
    """Lin et al. external-direct ``"all"`` (CVPR 2025): ``[mean(L_1..L_n); mean(L_{n+1}..L_D);
    L_23]``, n = D // 2 (Dense Connector DCI with the groups shifted by one and the base last)."""
    n, final = depth // 2, _scale(23, depth)
    g1, g2 = list(range(1, n + 1)), list(range(n + 1, depth + 1))
    return PresetPlan.concat([g1, g2, final])


@_preset("llava_next_slicefour")
def llava_next_slicefour(depth: int) -> PresetPlan:
    """LLaVA-NeXT ``slicefour_patch`` (Liu et al., "LLaVA-NeXT", 2024): with H = D + 1 hidden states
    and step = H // 4, layers ``step - 2, step - 2 + step, ... < H`` (select layer -2), i.e.
    ``[4, 10, 16, 22]`` at D = 24, channel-concatenated."""
    hidden, step = depth + 1, (depth + 1) // 4
    layers = list(range(step - 2, hidden, step))
    return PresetPlan.concat(layers)


@_preset("vip_llava")
def vip_llava(depth: int) -> PresetPlan:
    """ViP-LLaVA (Cai et al., "ViP-LLaVA: Making Large Multimodal Models Understand Arbitrary Visual
    Prompts", CVPR 2024), also LLaVA-NeXT's ``slice_m25811_f6``: layers ``[-2, -5, -8, -11, 6]``
    (``[23, 20, 17, 14, 6]`` at D = 24), concatenated in that order, then a LayerNorm over the
    concatenated width (eps 1e-5, HF ``VipLlava``'s ``projector_layernorm``)."""
    layers = [depth - 1, depth - 4, depth - 7, depth - 10, 6]
    return PresetPlan.concat(layers, norm=True, eps=1e-5)


@_preset("comm_clip")
def comm_clip(depth: int) -> PresetPlan:
    """COMM's CLIP branch (Jiang, Liu et al., "From CLIP to DINO: Visual Encoders Shout in Multi-modal
    LLMs", 2023): LLN-Layerscale over all blocks 1..D, ``sum_i a_i Lin_i(LN_i(P_i))``, free weights
    initialised to 1/D (specs §6.3), per-layer Linear width = input width."""
    return PresetPlan(tuple(range(1, depth + 1)), WeightedSumFuser, {"normalize": "none", "layer_proj": True})


@_preset("comm_dino")
def comm_dino(depth: int) -> PresetPlan:
    """COMM's DINOv2 branch (Jiang, Liu et al., 2023): LLN-Layerscale over the last six blocks
    (19..24 at D = 24), free weights initialised to 1/6."""
    return PresetPlan(
        tuple(range(depth - 5, depth + 1)), WeightedSumFuser, {"normalize": "none", "layer_proj": True}
    )


def preset_names() -> list[str]:
    """Names accepted by [`preset_plan`][layerfuse.presets.preset_plan], [`build_fuser`][layerfuse.presets.build_fuser] and the ``from_preset`` constructors."""
    return sorted(PRESETS)


def preset_plan(name: str, depth: int = 24) -> PresetPlan:
    """The layers, fuser class and options of preset ``name`` for a backbone of ``depth`` blocks."""
    where = "preset_plan"
    if name not in PRESETS:
        raise ValueError(f"{where}: name expected one of {', '.join(map(repr, preset_names()))}, got {name!r}")
    check_positive_int(where, "depth", depth)
    plan = PRESETS[name](depth)
    bad = [k for k in plan.layers if not 0 <= k <= depth]
    if bad:
        raise ValueError(
            f"{where}: preset {name!r} at depth={depth} needs hidden states {list(plan.layers)}, but a "
            f"{depth}-block backbone has 0..{depth}; use a deeper backbone"
        )
    return plan


def preset_layers(name: str, depth: int = 24) -> tuple[int, ...]:
    """Hidden-state indices preset ``name`` taps on a ``depth``-block backbone, in fuser input order."""
    return preset_plan(name, depth).layers


def build_fuser(
    name: str,
    *,
    dim: int,
    depth: int = 24,
    expect: type[F] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> F:
    """The fuser of preset ``name`` for inputs of width ``dim`` from a ``depth``-block backbone.

    Args:
        name: a preset name ([`preset_names`][layerfuse.presets.preset_names]).
        dim: ViT width C.
        depth: number of transformer blocks of the backbone. Default: ``24`` (CLIP ViT-L)
        expect: raise ``TypeError`` unless the preset builds this fuser class or a subclass (used by
            ``Fuser.from_preset``).
    """
    plan = preset_plan(name, depth)
    if expect is not None and not issubclass(plan.fuser, expect):
        raise TypeError(
            f"{expect.__name__}.from_preset: preset {name!r} builds a {plan.fuser.__name__}; use "
            f"{plan.fuser.__name__}.from_preset or layerfuse.presets.build_fuser"
        )
    return plan.build(dim, device=device, dtype=dtype)  # type: ignore[return-value]


def build_fusion_projector(
    name: str,
    *,
    dim: int,
    llm_dim: int,
    depth: int = 24,
    projector: str = "mlp2x_gelu",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> FusionProjector:
    """Preset fuser + LLaVA projector, with the ``layers``/``tokens`` that feed it.

    Args:
        name: a preset name ([`preset_names`][layerfuse.presets.preset_names]).
        dim: ViT width C.
        llm_dim: LLM hidden size.
        depth: number of transformer blocks of the backbone. Default: ``24``
        projector: LLaVA ``mm_projector_type``. Default: ``"mlp2x_gelu"``
    """
    plan = preset_plan(name, depth)
    fuser = build_fuser(name, dim=dim, depth=depth, device=device, dtype=dtype)
    proj = Projector(projector, fuser.out_dim, llm_dim, device=device, dtype=dtype)
    return FusionProjector(fuser, proj, layers=plan.layers, tokens=plan.tokens)
