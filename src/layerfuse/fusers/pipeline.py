"""Fuser + projector: the whole ``mm_projector`` of a multi-layer LLaVA, plus how to feed it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_choice
from ..features import TOKEN_MODES
from ..layers.projector import Projector
from ..serialization import PretrainedMixin
from .base import Fuser

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
        if len(layers) != fuser.num_inputs:
            raise ValueError(
                f"{where}: layers expected {fuser.num_inputs} indices (one per fuser input), got {list(layers)}"
            )
        self.fuser = fuser
        self.projector = projector
        self.layers = tuple(int(i) for i in layers)
        self.tokens = tokens

    @property
    def out_dim(self) -> int:
        return self.projector.out_dim

    def forward(self, features: Sequence[Tensor], **fuser_kwargs: Any) -> Tensor:
        """Fuse ``features`` and project; keyword arguments (``grid=``, ``text=``) go to the fuser."""
        return self.projector(self.fuser(features, **fuser_kwargs))

    def reset_parameters(self) -> None:
        self.fuser.reset_parameters()
        self.projector.reset_parameters()

    def extra_repr(self) -> str:
        return f"layers={list(self.layers)}, tokens={self.tokens!r}"

    def get_config(self) -> dict[str, Any]:
        return {
            "fuser": {"class": type(self.fuser).__name__, "config": self.fuser.get_config()},
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
        fuser_cls = PretrainedMixin.registry[config["fuser"]["class"]]
        fuser = fuser_cls.from_config(config["fuser"]["config"], device=device, dtype=dtype)
        projector = Projector(**config["projector"], device=device, dtype=dtype)
        return cls(fuser, projector, layers=config["layers"], tokens=config["tokens"])  # type: ignore[arg-type]
