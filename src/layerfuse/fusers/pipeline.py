"""Fuser + projector: the whole ``mm_projector`` of a multi-layer LLaVA, plus how to feed it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_index_list, check_module_inputs
from ..features import TOKEN_MODES
from ..layers.projector import Projector
from ..preset_plans import plan_for
from ..serialization import PretrainedMixin, real_class
from .base import Fuser, check_tapped_layers

__all__ = ["TOKEN_MODES", "FusionProjector"]


class FusionProjector(PretrainedMixin, nn.Module):
    r"""A fuser followed by a LLaVA projector, with the tap settings that feed it.

    This is what [`layerfuse.convert.from_official`][layerfuse.convert.from_official] returns: ``layers`` lists the hidden-state
    indices it consumes, in the order ``forward`` expects (negative indices allowed), and ``tokens``
    says which tokens each of them keeps, so the whole pipeline is

    ```python
    visual_tokens = module(LayerTap(vit, module.layers, tokens=module.tokens)(images))
    ```

    Args:
        fuser: any [`Fuser`][layerfuse.fusers.base.Fuser].
        projector: a [`Projector`][layerfuse.Projector] whose ``in_dim`` equals ``fuser.out_dim``.
        layers: hidden-state indices feeding ``fuser`` (index 0 = embedding output, k = block k).
        tokens: ``"patch"``, ``"cls_patch"`` or ``"all"``, as in [`LayerTap`][layerfuse.LayerTap].

    Shape:
        - features: ``len(layers)`` tensors (B, N_i, C_i); output: (B, N, projector.out_dim)
    """

    layers: tuple[int, ...]
    tokens: str

    def __init__(self, fuser: Fuser, projector: Projector, *, layers: Sequence[int], tokens: str = "patch") -> None:
        super().__init__()
        where = "FusionProjector"
        if not isinstance(fuser, Fuser):
            raise TypeError(f"{where}: fuser expected a layerfuse Fuser, got {type(fuser).__name__}")
        if not isinstance(projector, Projector):
            raise TypeError(f"{where}: projector expected a layerfuse Projector, got {type(projector).__name__}")
        if projector.in_dim != fuser.out_dim:
            raise ValueError(
                f"{where}: projector.in_dim expected fuser.out_dim={fuser.out_dim}, got {projector.in_dim}"
            )
        check_choice(where, "tokens", tokens, TOKEN_MODES)
        layers = check_index_list(where, "layers", layers)
        if len(layers) != fuser.num_inputs:
            raise ValueError(
                f"{where}: layers expected {fuser.num_inputs} indices (one per fuser input), got {list(layers)}"
            )
        self.fuser = fuser
        self.projector = projector
        self.layers = layers
        self.tokens = tokens

    @property
    def out_dim(self) -> int:
        return self.projector.out_dim

    @property
    def uses_text(self) -> bool:
        """Whether `forward` needs the instruction embedding `text` (the fuser's `uses_text`)."""
        return self.fuser.uses_text

    @classmethod
    def from_preset(
        cls,
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
        """A preset's fuser plus a LLaVA projector, with the preset's `layers` and `tokens`.

        Args:
            name: a preset name ([`preset_names`][layerfuse.presets.preset_names]).
            dim: ViT width C.
            llm_dim: LLM hidden size.
            depth: the backbone's number of transformer blocks. Required unless `tower` is given; there
                is no default.
            tower: the vision tower (any model [`LayerTap`][layerfuse.LayerTap] accepts) or its tap; its
                depth is used.
            projector: LLaVA `mm_projector_type`. Default: `"mlp2x_gelu"`
            device: where to build the parameters. Default: the default device.
            dtype: parameter dtype. Default: the default dtype.

        Returns:
            The module; `module.layers` and `module.tokens` say what to tap.

        Raises:
            TypeError: neither `depth` nor `tower` given.
            ValueError: unknown name, or a depth at which the preset degenerates (named in the message).

        Examples:
            >>> module = FusionProjector.from_preset("lin_ed_3_18_23", dim=1024, llm_dim=4096, depth=24)
            >>> module.layers, module.tokens, module.out_dim
            ((3, 18, 23), 'patch', 4096)
        """
        plan = plan_for(f"{cls.__name__}.from_preset", name, depth, tower)
        fuser = plan.build(dim, device=device, dtype=dtype)
        proj = Projector(projector, fuser.out_dim, llm_dim, device=device, dtype=dtype)
        return cls(fuser, proj, layers=plan.layers, tokens=plan.tokens)

    def forward(
        self,
        features: Sequence[Tensor],
        grid: Sequence[int] | None = None,
        level_grids: Sequence[Sequence[int]] | None = None,
        *,
        text: Tensor | None = None,
    ) -> Tensor:
        """Fuse ``features`` and project.

        Takes the arguments every fuser takes (see [`Fuser`][layerfuse.Fuser]) and passes them on;
        features tapped from other hidden states than ``layers`` are refused.
        """
        check_module_inputs("FusionProjector.forward", self, features=features)
        preset = self.fuser.preset
        check_tapped_layers("FusionProjector.forward", features, self.layers, None if preset is None else preset.depth)
        return self.projector(self.fuser(features, grid, level_grids, text=text))

    def reset_parameters(self) -> None:
        self.fuser.reset_parameters()
        self.projector.reset_parameters()

    def extra_repr(self) -> str:
        return f"layers={list(self.layers)}, tokens={self.tokens!r}"

    def get_config(self) -> dict[str, Any]:
        return {
            "fuser": {"class": real_class(self.fuser).__name__, "config": self.fuser.get_config()},
            "projector": self.projector.get_config(),
            "layers": list(self.layers),
            "tokens": self.tokens,
        }

    @classmethod
    def from_config(
        cls,
        config: dict[str, Any],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> FusionProjector:
        where = "FusionProjector.from_config"
        for key in ("fuser", "projector", "layers", "tokens"):
            if key not in config:
                raise ValueError(f"{where}: config expected a {key!r} entry, got keys {sorted(config)}")
        saved = config["fuser"]
        name = saved.get("class") if isinstance(saved, dict) else None
        fuser_cls = PretrainedMixin.registry.get(name) if isinstance(name, str) else None
        if fuser_cls is None or not isinstance(saved.get("config"), dict):
            raise ValueError(
                f"{where}: config['fuser'] expected {{'class': <a layerfuse fuser>, 'config': {{...}}}}, got {saved!r}"
            )
        fuser = fuser_cls.from_config(saved["config"], device=device, dtype=dtype)
        projector = Projector(**config["projector"], device=device, dtype=dtype)
        return cls(fuser, projector, layers=config["layers"], tokens=config["tokens"])  # type: ignore[arg-type]
