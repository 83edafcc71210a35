"""Drop-in projector builder and vision tower for the LLaVA codebase (the ``llava`` package).

LLaVA builds its ``mm_projector`` with ``build_vision_projector(config)`` and its tower with
``build_vision_tower(config)``, then computes visual tokens as ``mm_projector(vision_tower(images))``
(``LlavaMetaForCausalLM.encode_images``). This module provides both builders: the projector builder
understands every LLaVA projector type (``linear``, ``mlp{N}x_gelu``, ``identity``) and the layerfuse
ones (``mmfuser``, every preset name of ``layerfuse.presets``, ``layerfuse:<dir>``), and the tower
([`LayerfuseVisionTower`][layerfuse.integrations.llava.LayerfuseVisionTower]) returns the tapped
layers the fused projector needs as a [`LayerFeatures`][layerfuse.LayerFeatures]. Every fusion
parameter sits under ``mm_projector``, so LLaVA's stage-1 ``mm_projector.bin`` saving,
``--pretrain_mm_mlp_adapter`` loading, ``--mm_projector_lr``, ``--tune_mm_mlp_adapter`` and the LoRA
target search (``find_all_linear_names`` skips names containing ``mm_projector``) work unchanged.

The whole change in a training script is two lines, before the model is built:

```python
import layerfuse.integrations.llava
layerfuse.integrations.llava.patch()
```

This module never imports ``llava`` except inside [`patch`][layerfuse.integrations.llava.patch];
the builder and the tower need only torch and transformers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .._optional import require
from ..features import LayerFeatures
from ..fusers.base import Fuser
from ..fusers.concat import ConcatFuser
from ..fusers.mmfuser import MMFuser
from ..fusers.pipeline import FusionProjector
from ..fusers.weighted_sum import WeightedSumFuser
from ..layers.projector import Projector
from ..serialization import CONFIG_NAME

__all__ = [
    "CONFIG_KEY",
    "IdentityMap",
    "LayerfuseVisionTower",
    "LlavaFusionProjector",
    "build_vision_projector",
    "build_vision_tower",
    "fusion_types",
    "patch",
    "save_mm_adapter",
]

# The LLaVA config attribute under which the builder records what rebuilds the module at load time.
CONFIG_KEY = "mm_layerfuse"
# Prefix of a projector type naming a folder written by `save_pretrained`.
DIR_PREFIX = "layerfuse:"
# LLaVA's own types; `mlp{N}x_gelu` is matched by pattern as in LLaVA's builder.
_MLP = re.compile(r"^mlp(\d+)x_gelu$")
# MMFuser's `list-22/-17/-12/-7/-2` on the 24-block CLIP-L, as hidden-state indices 3, 8, 13, 18 (value
# levels) and 23 (the query, LLaVA's -2); other depths scale the levels by k * D // 24 and keep D - 1.
_MMFUSER_LEVELS = (3, 8, 13, 18)
# projector type -> (from_official method, its options); the types whose authors released checkpoints.
_OFFICIAL: dict[str, tuple[str, dict[str, Any]]] = {
    "mmfuser": ("mmfuser", {}),
    "dense_connector_sti": ("dense_connector", {"variant": "sti"}),
    "dense_connector_sci": ("dense_connector", {"variant": "sci"}),
    "dense_connector_dci": ("dense_connector", {"variant": "dci"}),
    "lin_ed_18": ("lin_ed", {"strategy": "18"}),
    "lin_ed_3_18_23": ("lin_ed", {"strategy": "3-18-23"}),
    "lin_ed_former": ("lin_ed", {"strategy": "former"}),
    "lin_ed_latter": ("lin_ed", {"strategy": "latter"}),
    "lin_ed_all": ("lin_ed", {"strategy": "all"}),
}
# Fusers that work token by token, so a CLS token in front of the patches is simply carried along.
_PER_TOKEN = (ConcatFuser, WeightedSumFuser)


def _preset(name: str, depth: int, tokens: str | None = None) -> tuple[Callable[[int], Fuser], type[Fuser], tuple[int, ...], str]:
    """Preset ``name`` on a ``depth``-block tower: a factory of its fuser for an input width, the fuser
    class, and the hidden-state indices and token mode that feed it (``tokens`` overrides the preset's,
    e.g. LLaVA's ``cls_patch``). The one place this module uses the presets API."""
    from dataclasses import replace

    from ..presets import preset_plan

    plan = preset_plan(name, depth)
    if tokens is not None:
        plan = replace(plan, tokens=tokens)
    return plan.build, plan.fuser_class, tuple(plan.layers), plan.tokens


def fusion_types() -> list[str]:
    """The layerfuse ``mm_projector_type`` names: ``"mmfuser"`` and every preset name.

    Each may carry a LLaVA projector after a ``+`` (``"dense_connector_dci+linear"``; default
    ``mlp2x_gelu``); ``"layerfuse:<dir>"`` names a folder written by ``save_pretrained``.
    """
    from ..presets import preset_names

    return ["mmfuser", *preset_names()]


class IdentityMap(nn.Module):
    """LLaVA's ``identity`` projector: returns its input (same ``config`` property as LLaVA's)."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return x

    @property
    def config(self) -> dict[str, str]:
        return {"mm_projector_type": "identity"}


class LlavaFusionProjector(FusionProjector):
    r"""The ``mm_projector`` of a multi-layer LLaVA: a `layerfuse.FusionProjector`
    that takes the tower's [`LayerFeatures`][layerfuse.LayerFeatures] and also loads the authors'
    ``mm_projector`` state-dict layout.

    Built by [`build_vision_projector`][layerfuse.integrations.llava.build_vision_projector]; its own
    keys are ``fuser.*`` and ``projector.{0,2,...}.*``. ``load_state_dict`` (what LLaVA's
    ``--pretrain_mm_mlp_adapter`` calls, with the ``mm_projector.`` prefix stripped) accepts those
    keys, or, when ``official`` names a method, the authors' own keys for it (MMFuser's ``0.*``,
    ``1.*``, ``3.*``; Dense Connector's ``0.*``, ``2.*``), converted by
    [`from_official`][layerfuse.from_official] and checked to describe this exact module.

    Args:
        fuser: any layerfuse fuser.
        projector: a `layerfuse.Projector` whose ``in_dim`` is ``fuser.out_dim``.
        layers: absolute hidden-state indices (0..depth) feeding ``fuser``, in its input order.
        tokens: token mode of the tap (``"patch"`` or ``"cls_patch"``).
        official: ``{"method": ..., **options}`` for [`from_official`][layerfuse.from_official], or
            ``None`` when no authors' layout exists for this type.

    Shape:
        - features: a ``LayerFeatures`` of ``len(layers)`` tensors (B, N, C) tapped at ``layers``
        - output: (B, N', projector.out_dim) visual tokens
    """

    official: dict[str, Any] | None

    def __init__(
        self,
        fuser: Fuser,
        projector: Projector,
        *,
        layers: Sequence[int],
        tokens: str = "patch",
        official: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(fuser, projector, layers=layers, tokens=tokens)
        if any(k < 0 for k in self.layers):
            raise ValueError(f"LlavaFusionProjector: layers expected absolute indices >= 0, got {list(self.layers)}")
        self.official = None if official is None else dict(official)

    def forward(self, features: Sequence[Tensor], **fuser_kwargs: Any) -> Tensor:  # type: ignore[override]
        """Fuse the tapped layers and project them to the LLM width.

        Raises:
            TypeError: ``features`` is one tensor (LLaVA's stock tower is installed, not
                [`LayerfuseVisionTower`][layerfuse.integrations.llava.LayerfuseVisionTower]).
            ValueError: ``features`` were tapped at other layers than this module was built for.
        """
        where = "LlavaFusionProjector.forward"
        if isinstance(features, Tensor):
            raise TypeError(
                f"{where}: features expected the LayerFeatures of LayerfuseVisionTower, got one tensor "
                f"{tuple(features.shape)}; LLaVA's stock vision tower is still installed: call "
                "layerfuse.integrations.llava.patch() before building the model"
            )
        if isinstance(features, LayerFeatures) and features.layers and tuple(features.layers) != self.layers:
            raise ValueError(
                f"{where}: features expected hidden states {list(self.layers)} (what this mm_projector was "
                f"built for), got {list(features.layers)}; the tower and the projector disagree on the "
                "projector type or tower depth"
            )
        return super().forward(features, **fuser_kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):  # type: ignore[override]
        """Load this module's own keys, or the authors' ``mm_projector`` keys of ``official``."""
        own = any(k.startswith(("fuser.", "projector.")) for k in state_dict)
        if own or self.official is None or not state_dict:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        return super().load_state_dict(self._from_authors(state_dict), strict=strict, assign=assign)

    def _from_authors(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        from ..convert import from_official

        where = "LlavaFusionProjector.load_state_dict"
        official = dict(self.official or {})
        method, depth = official.pop("method"), int(official.pop("depth"))
        anchor = "mm_projector_f" if method == "lin_ed" else "mm_projector"
        dtype = next(self.parameters()).dtype
        converted = from_official(method, {f"{anchor}.{k}": v for k, v in state_dict.items()}, dtype=dtype, **official)
        layers = tuple(k % (depth + 1) for k in converted.layers)
        mine = {"fuser": self.fuser.get_config(), "layers": list(self.layers), "tokens": self.tokens}
        theirs = {"fuser": converted.fuser.get_config(), "layers": list(layers), "tokens": converted.tokens}
        if type(converted.fuser) is not type(self.fuser) or mine != theirs or (
            converted.projector.get_config() != self.projector.get_config()
        ):
            raise ValueError(
                f"{where}: the {method} checkpoint describes {type(converted.fuser).__name__} {theirs} with "
                f"projector {converted.projector.get_config()}, but this mm_projector is "
                f"{type(self.fuser).__name__} {mine} with projector {self.projector.get_config()}"
            )
        return converted.state_dict()

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "official": self.official}

    @classmethod
    def from_config(
        cls,
        config: dict[str, Any],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> LlavaFusionProjector:
        base = FusionProjector.from_config(config, device=device, dtype=dtype)
        return cls(base.fuser, base.projector, layers=base.layers, tokens=base.tokens, official=config.get("official"))


def _split_type(projector_type: str) -> tuple[str, str]:
    if projector_type.startswith(DIR_PREFIX):  # a folder name may hold a '+'; its projector is saved
        return projector_type, "mlp2x_gelu"
    fusion, _, mlp = projector_type.partition("+")
    return fusion, mlp or "mlp2x_gelu"


def _is_fusion(projector_type: object) -> bool:
    if not isinstance(projector_type, str):
        return False
    fusion = _split_type(projector_type)[0]
    return fusion.startswith(DIR_PREFIX) or fusion in fusion_types()


def _check_not_igva(where: str, projector_type: str) -> None:
    if projector_type.lower().startswith(("igva", "instruction_gated")):
        raise ValueError(
            f"{where}: mm_projector_type {projector_type!r} (IGVA, instruction-gated fusion) is not supported "
            "in the LLaVA codebase: it needs the instruction text inside LLaVA's data path, which "
            "build_vision_projector cannot reach; use layerfuse.InstructionGatedFuser directly"
        )


def _tower_config(name: str) -> Any:
    """The vision config of a CLIP/SigLIP checkpoint name or folder (its ``vision_config`` if composite)."""
    transformers = require("transformers", extra="hf", purpose="the LLaVA vision tower")
    config = transformers.AutoConfig.from_pretrained(name)
    return getattr(config, "vision_config", None) or config


def _tower_source(config: Any) -> Any:
    return getattr(config, "mm_vision_tower", None) or getattr(config, "vision_tower", None)


def _vision_config_of(source: Any) -> Any:
    """The vision config of a tower given as a name/folder, a config object or a built model."""
    if isinstance(source, str):
        return _tower_config(source)
    if isinstance(source, nn.Module):
        source = getattr(source, "config", None)
    return getattr(source, "vision_config", None) or source


def _tower_family(config: Any) -> str:
    """``"siglip"`` or ``"clip"``, by the authors' rule: ``"siglip"`` in the tower's name (or type)."""
    source = _tower_source(config)
    if isinstance(source, str):
        name = source
    else:
        vision = _vision_config_of(source)
        name = f"{getattr(vision, 'name_or_path', '')} {getattr(vision, 'model_type', '')}"
    return "siglip" if "siglip" in name.lower() else "clip"


def _depth_of(where: str, config: Any, kwargs: Mapping[str, Any]) -> int:
    """The tower depth: ``vision_depth=``, the recorded value, or the tower's own config."""
    if kwargs.get("vision_depth") is not None:
        return int(kwargs["vision_depth"])
    recorded = getattr(config, CONFIG_KEY, None)
    if isinstance(recorded, Mapping) and "depth" in recorded:
        return int(recorded["depth"])
    source = _tower_source(config)
    depth = None if source is None else getattr(_vision_config_of(source), "num_hidden_layers", None)
    if not isinstance(depth, int):
        raise ValueError(
            f"{where}: cannot tell the vision tower's depth: the config names no mm_vision_tower with a "
            f"num_hidden_layers and has no {CONFIG_KEY} record; pass vision_depth= (number of transformer blocks)"
        )
    return depth


class _FusionSpec(NamedTuple):
    """What a fusion type resolves to on one tower, before anything is built."""

    build: Callable[[int], Fuser]  # input width -> fuser
    fuser_cls: type[Fuser]
    layers: tuple[int, ...]  # absolute hidden-state indices
    tokens: str


def _fusion_spec(where: str, fusion: str, config: Any, depth: int) -> _FusionSpec:
    """Layers, tokens and fuser of ``fusion`` on a ``depth``-block tower; shared by the projector
    builder and the tower, so the two cannot disagree."""
    if fusion == "mmfuser":
        levels = tuple(k * depth // 24 for k in _MMFUSER_LEVELS)
        heads = int(getattr(config, "mm_mmfuser_heads", 16))
        points = int(getattr(config, "mm_mmfuser_points", 4))
        spec = _FusionSpec(
            lambda dim: MMFuser(dim, len(levels), heads, points), MMFuser, (*levels, depth - 1), "patch"
        )
    else:
        spec = _FusionSpec(*_preset(fusion, depth))
    select_feature = getattr(config, "mm_vision_select_feature", "patch")
    if select_feature == "cls_patch":
        if not issubclass(spec.fuser_cls, _PER_TOKEN):
            raise ValueError(
                f"{where}: mm_vision_select_feature='cls_patch' needs a fuser that works token by token; "
                f"{fusion!r} builds a {spec.fuser_cls.__name__}, which needs patch tokens only (use 'patch')"
            )
        # the preset itself carries the token mode, so its fuser checks that the tap keeps the CLS
        return _FusionSpec(*_preset(fusion, depth, "cls_patch"))
    if select_feature != "patch":
        raise ValueError(f"{where}: mm_vision_select_feature expected 'patch' or 'cls_patch', got {select_feature!r}")
    return spec


def _fusion_module(where: str, fusion: str, mlp: str, config: Any, depth: int) -> LlavaFusionProjector:
    dim, llm_dim = int(config.mm_hidden_size), int(config.hidden_size)
    if fusion.startswith(DIR_PREFIX):
        saved = FusionProjector.from_pretrained(fusion[len(DIR_PREFIX):])
        layers = tuple(k % (depth + 1) for k in saved.layers)
        module = LlavaFusionProjector(saved.fuser, saved.projector, layers=layers, tokens=saved.tokens)
        if module.projector.out_dim != llm_dim:
            raise ValueError(
                f"{where}: {fusion!r} projects to width {module.projector.out_dim}, but the LLM hidden_size is {llm_dim}"
            )
        return module
    spec = _fusion_spec(where, fusion, config, depth)
    fuser = spec.build(dim)
    official = None
    if fusion in _OFFICIAL:
        method, options = _OFFICIAL[fusion]
        official = {"method": method, **options, "depth": depth}
        if isinstance(fuser, MMFuser):
            official.update(heads=fuser.heads, points=fuser.points, layers=list(spec.layers))
        else:
            official["tower"] = _tower_family(config)
            if method == "lin_ed" and official["tower"] == "siglip":
                # keep every SigLIP patch; the per-token projector weights still apply
                official["drop_first_token"] = False
    projector = Projector(mlp, fuser.out_dim, llm_dim)
    return LlavaFusionProjector(fuser, projector, layers=spec.layers, tokens=spec.tokens, official=official)


def build_vision_projector(config: Any, delay_load: bool = False, **kwargs: Any) -> nn.Module:
    """LLaVA's ``build_vision_projector``, plus the layerfuse fusion projectors.

    Reads ``config.mm_projector_type`` (default ``"linear"``, as LLaVA):

    - ``"linear"``, ``"mlp{N}x_gelu"``, ``"identity"``: exactly LLaVA's modules (``nn.Linear``,
      ``nn.Sequential``, [`IdentityMap`][layerfuse.integrations.llava.IdentityMap]), same keys.
    - ``"mmfuser"``: [`MMFuser`][layerfuse.MMFuser] on hidden states ``k * D // 24`` for
      k = 3, 8, 13, 18 (value levels) and ``D - 1`` (query, LLaVA's -2), i.e. the authors'
      ``list-22/-17/-12/-7/-2`` at D = 24; heads and points from ``config.mm_mmfuser_heads`` /
      ``mm_mmfuser_points`` (default 16 and 4, the authors').
    - a preset name of ``layerfuse.presets`` (``"dense_connector_dci"``, ``"lin_ed_3_18_23"``,
      ``"look_shallower"``, ``"vip_llava"``, ...), built for the tower's depth D.
    - ``"layerfuse:<dir>"``: the module a ``FusionProjector.save_pretrained(dir)`` wrote, with its
      weights.

    A fusion type may name the LLaVA projector behind the fuser after a ``+``
    (``"mmfuser+linear"``); the default is ``mlp2x_gelu``, what MMFuser, Dense Connector and Lin et
    al. use. The fuser reads ``config.mm_hidden_size`` (the tower width), the projector maps to
    ``config.hidden_size``; ``config.mm_vision_select_feature`` chooses ``"patch"`` (default) or
    ``"cls_patch"`` tokens (the latter only for token-wise fusers). ``mm_vision_select_layer`` is used
    by the stock types only: a fusion type taps the layers of its method.

    The tower depth D comes from ``vision_depth=``, else from the record below, else from the tower's
    config (``config.mm_vision_tower`` read with ``transformers.AutoConfig``). The builder records in
    ``config.mm_layerfuse`` the module's full configuration and D, so a checkpoint's ``config.json``
    rebuilds the same module at load time (``LlavaMetaModel.__init__``) with no access to the
    ``layerfuse:<dir>`` folder or the tower weights.

    Args:
        config: the LLaVA model config (or ``model_args``-like object) with the attributes above.
        delay_load: accepted for LLaVA's signature; unused.
        **kwargs: ``vision_depth`` (int) to state the tower depth. Others are ignored, as in LLaVA.

    Returns:
        An ``nn.Module`` for ``mm_projector``; a
        [`LlavaFusionProjector`][layerfuse.integrations.llava.LlavaFusionProjector] for fusion types.

    Raises:
        ValueError: an unknown type (the message lists the accepted ones), an IGVA type, a preset
            that does not fit the tower depth, or ``cls_patch`` with a spatial fuser.

    Examples:
        >>> from types import SimpleNamespace
        >>> cfg = SimpleNamespace(mm_projector_type="dense_connector_dci", mm_hidden_size=1024,
        ...                       hidden_size=4096, mm_vision_select_feature="patch")
        >>> proj = build_vision_projector(cfg, vision_depth=24)
        >>> proj.layers[:3], proj.projector[0].in_features, cfg.mm_layerfuse["depth"]
        ((0, 1, 2), 3072, 24)
    """
    where = "build_vision_projector"
    projector_type = getattr(config, "mm_projector_type", "linear")
    if not isinstance(projector_type, str):
        raise TypeError(f"{where}: mm_projector_type expected a str, got {type(projector_type).__name__}")
    if projector_type == "linear":
        return nn.Linear(config.mm_hidden_size, config.hidden_size)
    match = _MLP.match(projector_type)
    if match:
        modules: list[nn.Module] = [nn.Linear(config.mm_hidden_size, config.hidden_size)]
        for _ in range(1, int(match.group(1))):
            modules += [nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)]
        return nn.Sequential(*modules)
    if projector_type == "identity":
        return IdentityMap()
    _check_not_igva(where, projector_type)
    if not _is_fusion(projector_type):
        raise ValueError(
            f"{where}: Unknown projector type: {projector_type!r}; expected 'linear', 'mlp{{N}}x_gelu', "
            f"'identity', 'layerfuse:<dir>' or one of {', '.join(map(repr, fusion_types()))} (optionally "
            "followed by '+<LLaVA projector>', e.g. 'mmfuser+linear')"
        )

    recorded = getattr(config, CONFIG_KEY, None)
    if isinstance(recorded, Mapping) and recorded.get("projector_type") == projector_type:
        # load time: the checkpoint's config.json says exactly what was trained
        module = LlavaFusionProjector.from_config(recorded["module"])
    else:
        fusion, mlp = _split_type(projector_type)
        if not _MLP.match(mlp) and mlp not in ("linear", "identity"):
            raise ValueError(f"{where}: the projector after '+' expected 'linear' or 'mlp{{N}}x_gelu', got {mlp!r}")
        depth = _depth_of(where, config, kwargs)
        module = _fusion_module(where, fusion, mlp, config, depth)
        record = {"projector_type": projector_type, "depth": depth, "module": module.get_config()}
        setattr(config, CONFIG_KEY, json.loads(json.dumps(record)))
    return module


def _tap_plan(args: Any, depth: int) -> tuple[tuple[int, ...], str, bool]:
    """(hidden-state indices, token mode, whether the tower returns LayerFeatures) for ``args``."""
    projector_type = getattr(args, "mm_projector_type", "linear") or "linear"
    if not _is_fusion(projector_type):
        select_feature = getattr(args, "mm_vision_select_feature", "patch")
        return (int(getattr(args, "mm_vision_select_layer", -2)),), select_feature, False
    recorded = getattr(args, CONFIG_KEY, None)
    if isinstance(recorded, Mapping) and recorded.get("projector_type") == projector_type:
        module = recorded["module"]
        return tuple(module["layers"]), module["tokens"], True
    fusion = _split_type(projector_type)[0]
    if fusion.startswith(DIR_PREFIX):
        saved = json.loads((Path(fusion[len(DIR_PREFIX):]) / CONFIG_NAME).read_text())["config"]
        return tuple(k % (depth + 1) for k in saved["layers"]), saved["tokens"], True
    spec = _fusion_spec("LayerfuseVisionTower", fusion, args, depth)
    return spec.layers, spec.tokens, True


class LayerfuseVisionTower(nn.Module):
    r"""LLaVA's ``CLIPVisionTower`` interface over a CLIP or SigLIP tower, returning the tapped layers.

    With a layerfuse projector type (``config.mm_projector_type``, see
    [`build_vision_projector`][layerfuse.integrations.llava.build_vision_projector]) ``forward``
    returns a [`LayerFeatures`][layerfuse.LayerFeatures] holding the hidden states the fused
    projector needs, with the patch grid, from a [`LayerTap`][layerfuse.LayerTap] that stops after the
    deepest of them. With a stock type it returns LLaVA's single tensor (hidden state
    ``mm_vision_select_layer``, ``mm_vision_select_feature`` tokens), so it can replace LLaVA's tower
    outright. ``"patch"`` drops the CLS token of CLIP and nothing of SigLIP (which has none; LLaVA's
    ``[:, 1:]`` would drop a real patch there).

    The tower is frozen and runs under ``torch.no_grad`` as LLaVA's; its state-dict keys
    (``vision_tower.*``) are LLaVA's, so full checkpoints load unchanged.

    Args:
        vision_tower: a checkpoint name or folder (``transformers`` ``from_pretrained``), a
            ``CLIPVisionConfig`` / ``SiglipVisionConfig`` (or a composite ``CLIPConfig`` /
            ``SiglipConfig``; random weights, nothing downloaded), or a built ``CLIPVisionModel`` /
            ``SiglipVisionModel``.
        args: the LLaVA ``model_args`` or model config: ``mm_projector_type``,
            ``mm_vision_select_layer``, ``mm_vision_select_feature`` (and the fusion settings).
        delay_load: read only the tower config now; ``load_model()`` builds it (LLaVA's load-time path).

    Shape:
        - images: (B, 3, H_img, W_img)
        - output: ``LayerFeatures`` of (B, N, C) tensors (fusion types) or (B, N, C) (stock types), in
          the dtype of ``images``

    Raises:
        ValueError: a tower that is neither CLIP nor SigLIP, or layers beyond its depth.

    Examples:
        >>> from types import SimpleNamespace
        >>> from transformers import CLIPVisionConfig
        >>> cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=24,
        ...                        num_attention_heads=4, image_size=32, patch_size=8)
        >>> args = SimpleNamespace(mm_projector_type="lin_ed_3_18_23", mm_vision_select_layer=-2)
        >>> tower = LayerfuseVisionTower(cfg, args)
        >>> feats = tower(torch.randn(2, 3, 32, 32))
        >>> feats.layers, feats.grid, tuple(feats[0].shape)
        ((3, 18, 23), (4, 4), (2, 16, 32))
    """

    def __init__(self, vision_tower: Any, args: Any, delay_load: bool = False) -> None:
        super().__init__()
        self.is_loaded = False
        # kept out of the module tree: a built model becomes `vision_tower` only in load_model
        self.__dict__["_source"] = vision_tower
        if isinstance(vision_tower, str):
            self.vision_tower_name = vision_tower
        elif isinstance(vision_tower, nn.Module):
            self.vision_tower_name = getattr(getattr(vision_tower, "config", None), "name_or_path", "") or ""
        else:
            self.vision_tower_name = getattr(vision_tower, "name_or_path", "") or ""
        self.select_layer = getattr(args, "mm_vision_select_layer", -2)
        self.select_feature = getattr(args, "mm_vision_select_feature", "patch")
        self._args = args
        if not delay_load or getattr(args, "unfreeze_mm_vision_tower", False):
            self.load_model()
        else:
            self.cfg_only = self._vision_config()

    def _vision_config(self) -> Any:
        return _vision_config_of(self._source)

    def load_model(self, device_map: Any = None) -> None:
        """Build (or load) the tower and its image processor; a second call does nothing, as LLaVA's."""
        if self.is_loaded:
            return
        transformers = require("transformers", extra="hf", purpose="the LLaVA vision tower")
        config = self._vision_config()
        family = getattr(config, "model_type", "")
        classes = {
            "clip_vision_model": (transformers.CLIPVisionModel, transformers.CLIPImageProcessor),
            "siglip_vision_model": (transformers.SiglipVisionModel, transformers.SiglipImageProcessor),
        }
        if family not in classes:
            raise ValueError(
                f"LayerfuseVisionTower: vision_tower expected a CLIP or SigLIP vision tower, got a config of "
                f"model_type {family!r} ({type(config).__name__})"
            )
        model_cls, processor_cls = classes[family]
        source = self._source
        if isinstance(source, str):
            model = model_cls.from_pretrained(source, device_map=device_map)
            processor = processor_cls.from_pretrained(source)
        else:
            model = source if isinstance(source, nn.Module) else model_cls(config)
            size = config.image_size
            processor = (
                processor_cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
                if family == "clip_vision_model" else processor_cls(size={"height": size, "width": size})
            )
        model.requires_grad_(False)
        self.image_processor = processor
        self.vision_tower = model
        self._install_tap()
        self.is_loaded = True

    def _install_tap(self) -> None:
        from ..taps import LayerTap

        layers, tokens, fused = _tap_plan(self._args, int(self.vision_tower.config.num_hidden_layers))
        # kept out of the module tree so the state-dict keys stay LLaVA's (vision_tower.*)
        self.__dict__["_tap"] = LayerTap(self.vision_tower, layers, tokens=tokens)
        self.returns_layers = fused

    @property
    def tap(self) -> Any:
        """The [`LayerTap`][layerfuse.LayerTap] this tower reads hidden states with."""
        return self.__dict__["_tap"]

    def _features(self, images: Tensor) -> Tensor | LayerFeatures:
        features = self.tap(images.to(device=self.device, dtype=self.dtype))
        if not self.returns_layers:
            return features[0].to(images.dtype)
        return LayerFeatures(
            [f.to(images.dtype) for f in features], grid=features.grid, layers=features.layers,
            num_prefix_tokens=features.num_prefix_tokens,
        )

    @torch.no_grad()
    def forward(self, images: Tensor | list[Tensor]) -> Any:
        """Hidden states of ``images``: ``LayerFeatures`` for fusion types, one tensor for stock types;
        a list of images gives a list of results, one per image (as LLaVA's tower)."""
        if isinstance(images, list):
            return [self._features(image.unsqueeze(0)) for image in images]
        return self._features(images)

    @property
    def dummy_feature(self) -> Tensor:
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_tower.device

    @property
    def config(self) -> Any:
        return self.vision_tower.config if self.is_loaded else self.cfg_only

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_patches_per_side(self) -> int:
        return self.config.image_size // self.config.patch_size

    @property
    def num_patches(self) -> int:
        return (self.config.image_size // self.config.patch_size) ** 2


def build_vision_tower(vision_tower_cfg: Any, **kwargs: Any) -> LayerfuseVisionTower:
    """LLaVA's ``build_vision_tower`` for CLIP and SigLIP towers: a
    [`LayerfuseVisionTower`][layerfuse.integrations.llava.LayerfuseVisionTower] of
    ``mm_vision_tower`` (or ``vision_tower``), which may be a name, a folder, a config or a model.

    Args:
        vision_tower_cfg: the LLaVA config or ``model_args``.
        **kwargs: ``delay_load``, as LLaVA's.
    """
    tower = getattr(vision_tower_cfg, "mm_vision_tower", getattr(vision_tower_cfg, "vision_tower", None))
    if tower is None:
        raise ValueError("build_vision_tower: the config names no mm_vision_tower / vision_tower")
    return LayerfuseVisionTower(tower, args=vision_tower_cfg, **kwargs)


def patch(llava: Any = None) -> None:
    """Install [`build_vision_projector`][layerfuse.integrations.llava.build_vision_projector] and
    [`build_vision_tower`][layerfuse.integrations.llava.build_vision_tower] into an imported ``llava``.

    Replaces the two builders in ``llava.model.multimodal_projector.builder``,
    ``llava.model.multimodal_encoder.builder`` and ``llava.model.llava_arch`` (which imported them by
    name), so every model built or loaded afterwards (``initialize_vision_modules``,
    ``from_pretrained``, ``load_pretrained_model``) uses them. Stock projector types keep working:
    the builder makes LLaVA's modules and the tower returns LLaVA's tensor for them. Calling it twice
    is harmless.

    Args:
        llava: the ``llava`` package; imported when ``None``.

    Raises:
        ImportError: ``llava`` (``pip install llava-torch --no-deps``) is not installed.

    Examples:
        >>> import layerfuse.integrations.llava
        >>> layerfuse.integrations.llava.patch()   # doctest: +SKIP
    """
    if llava is None:
        try:
            import llava
        except ImportError as err:
            raise ImportError(
                "layerfuse.integrations.llava.patch needs the LLaVA codebase ('llava' package), which is not "
                "installed; install it with: pip install llava-torch --no-deps"
            ) from err
    import importlib

    projector_builder = importlib.import_module("llava.model.multimodal_projector.builder")
    tower_builder = importlib.import_module("llava.model.multimodal_encoder.builder")
    arch = importlib.import_module("llava.model.llava_arch")
    for module in (projector_builder, arch):
        module.build_vision_projector = build_vision_projector
    for module in (tower_builder, arch):
        module.build_vision_tower = build_vision_tower


def save_mm_adapter(module: nn.Module, path: str | Path) -> Path:
    """Write ``module`` as a stage-1 ``mm_projector.bin`` (keys ``model.mm_projector.<key>``).

    The file loads with LLaVA's ``--pretrain_mm_mlp_adapter`` into an ``mm_projector`` built by
    [`build_vision_projector`][layerfuse.integrations.llava.build_vision_projector] with the matching
    type. Use it for Lin et al.'s checkpoints, whose ``mm_projector_f.*`` keys LLaVA's loader cannot
    split: ``save_mm_adapter(from_official("lin_ed", path, strategy="3-18-23"), "mm_projector.bin")``,
    then ``--mm_projector_type lin_ed_3_18_23``.

    Args:
        module: a `layerfuse.FusionProjector` (e.g. from
            [`from_official`][layerfuse.from_official]) or any ``mm_projector`` module.
        path: the file to write.

    Returns:
        ``path`` as a ``Path``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"save_mm_adapter: module expected an nn.Module, got {type(module).__name__}")
    path = Path(path)
    state = {f"model.mm_projector.{k}": v.detach().cpu().clone() for k, v in module.state_dict().items()}
    torch.save(state, path)
    return path

