"""The published layer-fusion configurations as data: which hidden states to tap, which fuser, its options.

Every preset is a function of the backbone depth D (number of transformer blocks; hidden-state
indices 0..D, index 0 = embedding output, k = output of block k, the convention of
[`LayerTap`][layerfuse.LayerTap] and HF `hidden_states`). At D = 24 (CLIP ViT-L/14-336) the layers
are exactly the authors'. For other depths each preset states its rule; the ones used here are

- `scale(k) = floor(k * D / 24)`: a layer chosen on the 24-block CLIP-L is mapped proportionally,
  Lin et al.'s own rule for SigLIP (`3-18-23` -> `3, 20, 25` at D = 27);
- Dense Connector keeps its indices 7 and 15 for D >= 24 (as the authors do on SigLIP) and scales
  them below;
- "penultimate" is D - 1 (LLaVA's `-2`);
- halves: `n = D // 2`.

There is no default depth: a plan is made for the depth the caller states, or for the depth of the
tower it is given. A depth at which a preset degenerates (two channel blocks that are the same layer,
a layer mean over a single layer, a slice step of zero, a hidden state the backbone does not have)
is refused with a `ValueError` naming the preset and the depth.

This module holds data only and imports no fuser: a plan names its fuser class, and the class builds
itself ([`Fuser.from_preset`][layerfuse.Fuser.from_preset]); the factories for any kind of fuser
([`build_fuser`][layerfuse.presets.build_fuser],
[`build_fusion_projector`][layerfuse.presets.build_fusion_projector]) live in
`layerfuse.presets`, above both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._checks import check_positive_int
from .serialization import PretrainedMixin
from .taps import LayerTap, find_backbone

if TYPE_CHECKING:
    from .fusers.base import Fuser

__all__ = [
    "PRESETS",
    "PresetPlan",
    "preset_layers",
    "preset_names",
    "preset_plan",
]

# How far up preset_plan looks for the smallest depth a degenerate preset supports (only for the message).
_DEPTH_SEARCH_LIMIT = 64


class PresetDegenerate(ValueError):
    """A preset's rule breaks down at the requested depth (raised inside a preset, reworded by ``preset_plan``)."""


@dataclass(frozen=True)
class PresetPlan:
    """What a preset resolves to for one depth.

    Attributes:
        layers: hidden-state indices to tap, in the fuser's input order.
        fuser: the name of the fuser class (e.g. `"ConcatFuser"`); [`fuser_class`][layerfuse.presets.PresetPlan.fuser_class]
            is the class.
        options: constructor keyword arguments besides the widths, inputs and factory kwargs.
        tokens: the tap's token mode (`"patch"`, `"cls_patch"` or `"all"`).
        name: the preset's name, or `None` for a plan built directly (e.g. by a checkpoint converter).
        depth: the backbone depth the plan was made for, or `None` when not known.

    Examples:
        >>> plan = preset_plan("lin_ed_3_18_23", depth=24)
        >>> plan.layers, plan.fuser, plan.tokens
        ((3, 18, 23), 'ConcatFuser', 'patch')
        >>> plan.build(1024).out_dim
        3072
    """

    layers: tuple[int, ...]
    fuser: str
    options: dict[str, Any] = field(default_factory=dict)
    tokens: str = "patch"
    name: str | None = None
    depth: int | None = None

    @property
    def fuser_class(self) -> type[Fuser]:
        """The fuser class named by `fuser`."""
        return PretrainedMixin.registry[self.fuser]  # type: ignore[return-value]

    def describe(self) -> str:
        """`"preset 'x' at depth=D"`, or `"a preset plan"` when the plan has no name, for messages."""
        if self.name is None:
            return "a preset plan"
        depth = "" if self.depth is None else f" at depth={self.depth}"
        return f"preset {self.name!r}{depth}"

    def build(
        self, dim: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Fuser:
        """The fuser for inputs of width `dim`, carrying this plan (its `layers`, `tokens` and `preset`).

        Args:
            dim: ViT width C of every tapped layer.
            device: where to build the parameters. Default: the default device.
            dtype: parameter dtype. Default: the default dtype.

        Returns:
            A fresh instance of [`fuser_class`][layerfuse.presets.PresetPlan.fuser_class].
        """
        return self.fuser_class._from_plan(self, dim, device=device, dtype=dtype)

    @classmethod
    def concat(cls, groups: Sequence[int | Sequence[int]], **options: Any) -> PresetPlan:
        """A [`ConcatFuser`][layerfuse.ConcatFuser] plan from channel blocks named by hidden-state index.

        Each entry of `groups` is a hidden-state index or a sequence of them to average. Each layer
        is tapped once, even if used twice (Dense Connector DCI's base inside its second group): in
        block order for plain layers, in ascending order when there are group means (so the inputs
        of DCI on CLIP-L are hidden states 0..23 and its terms read `[23, 0..11, 12..23]`).

        Args:
            groups: the channel blocks, in output order.
            **options: further [`ConcatFuser`][layerfuse.ConcatFuser] keyword arguments (`norm`,
                `eps`, `drop_first_token`).

        Returns:
            The plan; its `name` and `depth` are `None`.
        """
        layers: list[int] = []
        for g in groups:
            layers.extend(k for k in ((g,) if isinstance(g, int) else g) if k not in layers)
        if not all(isinstance(g, int) for g in groups):
            layers.sort()
        pos = {layer: i for i, layer in enumerate(layers)}
        terms = [pos[g] if isinstance(g, int) else [pos[k] for k in g] for g in groups]
        return cls(tuple(layers), "ConcatFuser", {"terms": terms, **options})

    def blocks(self) -> list[tuple[int, ...]]:
        """What each output block reads, as hidden-state indices: a one-element tuple for a single
        layer, several for a layer mean (a [`ConcatFuser`][layerfuse.ConcatFuser] term); one block
        per input for the other fusers."""
        terms = self.options.get("terms") if self.fuser == "ConcatFuser" else None
        if terms is None:
            return [(k,) for k in self.layers]
        return [(self.layers[t],) if isinstance(t, int) else tuple(self.layers[i] for i in t) for t in terms]

    def degeneracies(self) -> list[str]:
        """Why this plan is not what its preset means at its depth (empty when it is sound)."""
        reasons = []
        if self.depth is not None:
            outside = [k for k in self.layers if not 0 <= k <= self.depth]
            if outside:
                reasons.append(
                    f"it needs hidden states {list(self.layers)}, but a {self.depth}-block backbone has "
                    f"0..{self.depth} ({outside} do not exist)"
                )
        terms = self.options.get("terms", ()) if self.fuser == "ConcatFuser" else ()
        for term, block in zip(terms, self.blocks()):
            if not isinstance(term, int) and len(block) < 2:
                reasons.append(f"its layer mean over {list(block)} has a single layer")
        seen: dict[frozenset[int], tuple[int, ...]] = {}
        for block in self.blocks():
            key = frozenset(block)
            if key in seen:
                what = f"layer {block[0]}" if len(block) == 1 else f"the mean of layers {list(block)}"
                reasons.append(f"it would use {what} twice")
            seen[key] = block
        return reasons

    def to_config(self) -> dict[str, Any]:
        """JSON-serialisable fields, read back by [`from_config`][layerfuse.presets.PresetPlan.from_config]."""
        return {
            "name": self.name,
            "depth": self.depth,
            "layers": list(self.layers),
            "fuser": self.fuser,
            "options": self.options,
            "tokens": self.tokens,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PresetPlan:
        """The plan written by [`to_config`][layerfuse.presets.PresetPlan.to_config]."""
        return cls(
            layers=tuple(config["layers"]),
            fuser=config["fuser"],
            options=dict(config.get("options", {})),
            tokens=config.get("tokens", "patch"),
            name=config.get("name"),
            depth=config.get("depth"),
        )


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
    """LLaVA-1.5's single penultimate layer, `[D - 1]` (Liu et al., "Improved Baselines with Visual
    Instruction Tuning", CVPR 2024). The baseline the fusion presets are compared with."""
    return PresetPlan.concat([depth - 1])


@_preset("dense_connector_sti")
def dense_connector_sti(depth: int) -> PresetPlan:
    """Dense Connector STI (Yao et al., "Dense Connector for MLLMs", NeurIPS 2024): tokens of the
    penultimate layer followed by 1-D pool-8 tokens of layers 7 and 15. The authors keep 7 and 15 on
    the deeper SigLIP tower, so they are kept for D >= 24 and scaled (`scale(k)`) below; the base is
    D - 1."""
    layers = (depth - 1, _keep(7, depth), _keep(15, depth))
    return PresetPlan(layers, "TokenConcatFuser", {"pool": "1d", "window": 8})


@_preset("dense_connector_sci")
def dense_connector_sci(depth: int) -> PresetPlan:
    """Dense Connector SCI (Yao et al., NeurIPS 2024): channels `[L_{D-1}; L_7; L_15]` (7 and 15 kept
    for D >= 24 as the authors do for SigLIP, `scale(k)` below)."""
    return PresetPlan.concat([depth - 1, _keep(7, depth), _keep(15, depth)])


@_preset("dense_connector_dci")
def dense_connector_dci(depth: int) -> PresetPlan:
    """Dense Connector DCI (Yao et al., NeurIPS 2024): channels `[L_{D-1}; mean(L_0..L_{n-1});
    mean(L_n..L_{2n-1})]` with n = D // 2, the code's index ranges (0..11 / 12..23 at D = 24, the
    second group containing the base again; 0..12 / 13..25 with base 26 at D = 27, the authors'
    SigLIP values)."""
    n = depth // 2
    g1, g2 = list(range(0, n)), list(range(n, 2 * n))
    if n == 0:
        raise PresetDegenerate("its layer groups 0..n-1 and n..2n-1 are empty (n = D // 2 = 0)")
    return PresetPlan.concat([depth - 1, g1, g2])


@_preset("lin_ed_18")
def lin_ed_18(depth: int) -> PresetPlan:
    """Lin et al. external-direct `"18"` (Lin et al., "Multi-Layer Visual Feature Fusion in MLLMs",
    CVPR 2025): channels `[L_18; L_23]`, final layer last; `scale(k)` at other depths."""
    layers = [_scale(18, depth), _scale(23, depth)]
    return PresetPlan.concat(layers)


@_preset("lin_ed_3_18_23")
def lin_ed_3_18_23(depth: int) -> PresetPlan:
    """Lin et al. external-direct `"3-18-23"` (CVPR 2025): channels `[L_3; L_18; L_23]`;
    `scale(k)` at other depths (`[3, 20, 25]` at D = 27, as the authors do for SigLIP)."""
    layers = [_scale(3, depth), _scale(18, depth), _scale(23, depth)]
    return PresetPlan.concat(layers)


@_preset("look_shallower")
def look_shallower(depth: int) -> PresetPlan:
    """The 3-18-23 fusion of Chen, Lin et al., "Multimodal Language Models See Better When They Look
    Shallower" (EMNLP 2025): one shallow, one middle and one deep layer, `[L_3; L_18; L_23]`
    (the same model as `lin_ed_3_18_23`); pair it with a `linear` or `mlp2x_gelu` projector."""
    return lin_ed_3_18_23(depth)


@_preset("lin_ed_former")
def lin_ed_former(depth: int) -> PresetPlan:
    """Lin et al. external-direct `"former"` (CVPR 2025): `[mean(L_1..L_n); L_23]`, n = D // 2,
    final layer `scale(23)`."""
    n, final = depth // 2, _scale(23, depth)
    if n == 0:
        raise PresetDegenerate("its layer group 1..n is empty (n = D // 2 = 0)")
    return PresetPlan.concat([list(range(1, n + 1)), final])


@_preset("lin_ed_latter")
def lin_ed_latter(depth: int) -> PresetPlan:
    """Lin et al. external-direct `"latter"` (CVPR 2025): `[mean(L_{D-n+1}..L_D); L_23]`,
    n = D // 2 (13..24 at D = 24; the group contains the final layer again)."""
    n, final = depth // 2, _scale(23, depth)
    if n == 0:
        raise PresetDegenerate("its layer group D-n+1..D is empty (n = D // 2 = 0)")
    return PresetPlan.concat([list(range(depth - n + 1, depth + 1)), final])


@_preset("lin_ed_all")
def lin_ed_all(depth: int) -> PresetPlan:
    """Lin et al. external-direct `"all"` (CVPR 2025): `[mean(L_1..L_n); mean(L_{n+1}..L_D);
    L_23]`, n = D // 2 (Dense Connector DCI with the groups shifted by one and the base last)."""
    n, final = depth // 2, _scale(23, depth)
    if n == 0:
        raise PresetDegenerate("its layer group 1..n is empty (n = D // 2 = 0)")
    return PresetPlan.concat([list(range(1, n + 1)), list(range(n + 1, depth + 1)), final])


@_preset("llava_next_slicefour")
def llava_next_slicefour(depth: int) -> PresetPlan:
    """LLaVA-NeXT `slicefour_patch` (Liu et al., "LLaVA-NeXT", 2024): with H = D + 1 hidden states
    and step = H // 4, layers `step - 2, step - 2 + step, ... < H` (select layer -2), i.e.
    `[4, 10, 16, 22]` at D = 24, channel-concatenated. The authors' projector takes four times the
    ViT width, so a depth at which the rule gives other than four layers is refused."""
    hidden, step = depth + 1, (depth + 1) // 4
    if step == 0:
        raise PresetDegenerate(f"its slice step (D + 1) // 4 is 0 with D + 1 = {hidden} hidden states")
    layers = list(range(step - 2, hidden, step))
    if len(layers) != 4:
        raise PresetDegenerate(
            f"the rule (step = (D + 1) // 4 = {step}, layers step - 2, 2 * step - 2, ... < D + 1) gives "
            f"{len(layers)} layers {layers}, not the four the authors' projector (4 x the ViT width) takes"
        )
    return PresetPlan.concat(layers)


@_preset("vip_llava")
def vip_llava(depth: int) -> PresetPlan:
    """ViP-LLaVA (Cai et al., "ViP-LLaVA: Making Large Multimodal Models Understand Arbitrary Visual
    Prompts", CVPR 2024), also LLaVA-NeXT's `slice_m25811_f6`: layers `[-2, -5, -8, -11, 6]`
    (`[23, 20, 17, 14, 6]` at D = 24), concatenated in that order, then a LayerNorm over the
    concatenated width (eps 1e-5, HF `VipLlava`'s `projector_layernorm`)."""
    layers = [depth - 1, depth - 4, depth - 7, depth - 10, 6]
    return PresetPlan.concat(layers, norm=True, eps=1e-5)


@_preset("comm_clip")
def comm_clip(depth: int) -> PresetPlan:
    """COMM's CLIP branch (Jiang, Liu et al., "From CLIP to DINO: Visual Encoders Shout in Multi-modal
    LLMs", 2023): LLN-Layerscale over all blocks 1..D, `sum_i a_i Lin_i(LN_i(P_i))`, free weights
    initialised to 1/D (specs §6.3), per-layer Linear width = input width."""
    return PresetPlan(tuple(range(1, depth + 1)), "WeightedSumFuser", {"normalize": "none", "layer_proj": True})


@_preset("comm_dino")
def comm_dino(depth: int) -> PresetPlan:
    """COMM's DINOv2 branch (Jiang, Liu et al., 2023): LLN-Layerscale over the last six blocks
    (19..24 at D = 24), free weights initialised to 1/6."""
    return PresetPlan(
        tuple(range(depth - 5, depth + 1)), "WeightedSumFuser", {"normalize": "none", "layer_proj": True}
    )


def preset_names() -> list[str]:
    """Names accepted by [`preset_plan`][layerfuse.presets.preset_plan],
    [`build_fuser`][layerfuse.presets.build_fuser] and the `from_preset` constructors."""
    return sorted(PRESETS)


def tower_depth(where: str, tower: object) -> int:
    """The number of transformer blocks of `tower`: a [`LayerTap`][layerfuse.LayerTap] or any model a
    tap accepts (found by structure, as the tap finds it)."""
    if isinstance(tower, LayerTap):
        return tower.backbone.depth
    if not isinstance(tower, nn.Module):
        raise TypeError(
            f"{where}: tower expected the vision tower (an nn.Module a LayerTap accepts) or its LayerTap, "
            f"got {type(tower).__name__}"
        )
    return find_backbone(tower).depth


def resolve_depth(where: str, name: str, depth: object, tower: object) -> int:
    """The depth a preset is made for: `depth`, or the depth of `tower`; one of them is required."""
    if tower is not None:
        found = tower_depth(where, tower)
        if depth is not None and depth != found:
            raise ValueError(
                f"{where}: depth={depth!r} contradicts the tower, which has {found} blocks; pass one of them"
            )
        return found
    if depth is None:
        raise TypeError(
            f"{where}: preset {name!r} needs the backbone's depth: pass depth=D (its number of transformer "
            "blocks: 24 for CLIP ViT-L/14, 27 for SigLIP-so400m, 12 for ViT-B) or tower= (the vision tower "
            "or its LayerTap); there is no default depth"
        )
    return check_positive_int(where, "depth", depth)


def _make(name: str, depth: int) -> tuple[PresetPlan | None, list[str]]:
    try:
        plan = replace(PRESETS[name](depth), name=name, depth=depth)
    except PresetDegenerate as err:
        return None, [str(err)]
    return plan, plan.degeneracies()


def plan_for(where: str, name: object, depth: object = None, tower: object = None) -> PresetPlan:
    """[`preset_plan`][layerfuse.presets.preset_plan] with the caller's name in its messages."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"{where}: name expected one of {', '.join(map(repr, preset_names()))}, got {name!r}")
    depth = resolve_depth(where, name, depth, tower)
    plan, reasons = _make(name, depth)
    if reasons:
        smallest = next((d for d in range(1, _DEPTH_SEARCH_LIMIT + 1) if not _make(name, d)[1]), None)
        hint = f"; the smallest depth it supports is {smallest}" if smallest is not None else ""
        raise ValueError(
            f"{where}: preset {name!r} degenerates at depth={depth}: {'; '.join(reasons)}{hint}"
        )
    return plan  # type: ignore[return-value]


def preset_plan(name: str, depth: int | None = None, *, tower: nn.Module | None = None) -> PresetPlan:
    """The layers, fuser class and options of preset `name` for a backbone of `depth` blocks.

    Args:
        name: a preset name ([`preset_names`][layerfuse.presets.preset_names]).
        depth: number of transformer blocks of the backbone (24 for CLIP ViT-L/14, 27 for
            SigLIP-so400m). Required unless `tower` is given.
        tower: the vision tower (any model [`LayerTap`][layerfuse.LayerTap] accepts) or its tap; its
            depth is used.

    Returns:
        The plan, with `name` and `depth` set.

    Raises:
        ValueError: unknown name; a depth at which the preset degenerates (a layer used twice, a mean
            over one layer, a zero slice step, a hidden state the backbone does not have), naming the
            preset, the depth and the smallest depth the preset supports; `depth` contradicting `tower`.
        TypeError: neither `depth` nor `tower` given; `depth` not a positive int.

    Examples:
        >>> preset_plan("dense_connector_sci", depth=27).layers
        (26, 7, 15)
        >>> preset_plan("lin_ed_18", depth=4)
        Traceback (most recent call last):
        ValueError: preset_plan: preset 'lin_ed_18' degenerates at depth=4: it would use layer 3 twice; ...
    """
    return plan_for("preset_plan", name, depth, tower)


def preset_layers(name: str, depth: int | None = None, *, tower: nn.Module | None = None) -> tuple[int, ...]:
    """Hidden-state indices preset `name` taps on a `depth`-block backbone, in fuser input order.

    Takes the arguments of [`preset_plan`][layerfuse.presets.preset_plan] and raises its errors.

    Examples:
        >>> preset_layers("lin_ed_3_18_23", depth=24)
        (3, 18, 23)
        >>> preset_layers("lin_ed_3_18_23", depth=27)
        (3, 20, 25)
    """
    return plan_for("preset_layers", name, depth, tower).layers
