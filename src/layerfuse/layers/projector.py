"""LLaVA's ``mm_projector`` builder (``linear``, ``mlp{N}x_gelu``, ``identity``) with its key layout."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_module_inputs, check_positive_int, check_string, factory_kwargs
from ..serialization import PretrainedMixin

__all__ = ["Projector", "build_projector"]

_MLP = re.compile(r"^mlp(\d+)x_gelu$")


class Projector(PretrainedMixin, nn.Sequential):
    r"""The LLaVA vision-to-language projector.

    ``linear`` is one ``Linear(in_dim, out_dim)``; ``mlp{N}x_gelu`` is ``Linear(in_dim, out_dim)``
    followed by N-1 pairs ``(GELU, Linear(out_dim, out_dim))`` with the exact (erf) GELU; ``identity``
    passes features through (``in_dim`` must equal ``out_dim``). The module is an ``nn.Sequential``
    whose Linears sit at indices 0, 2, 4, ..., so its ``state_dict`` keys are those of LLaVA's
    ``mm_projector`` (``0.weight``, ``0.bias``, ``2.weight``, ...).

    Args:
        kind: ``"linear"``, ``"identity"`` or ``"mlp{N}x_gelu"`` (N >= 1; LLaVA-1.5 uses ``mlp2x_gelu``).
        in_dim: width of the fused features.
        out_dim: LLM hidden size.

    Shape:
        - input: (\*, in_dim); output: (\*, out_dim)

    Examples:
        >>> proj = Projector("mlp2x_gelu", 3072, 4096)
        >>> proj(torch.randn(2, 576, 3072)).shape
        torch.Size([2, 576, 4096])
    """

    kind: str
    in_dim: int
    out_dim: int

    def __init__(
        self,
        kind: str,
        in_dim: int,
        out_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        where = "Projector"
        check_string(where, "kind", kind, "a projector type string ('linear', 'identity' or 'mlp{N}x_gelu')")
        check_positive_int(where, "in_dim", in_dim)
        check_positive_int(where, "out_dim", out_dim)
        dd: dict[str, Any] = factory_kwargs(where, device, dtype)
        if kind == "identity":
            if in_dim != out_dim:
                raise ValueError(f"{where}: kind='identity' needs in_dim == out_dim, got {in_dim} and {out_dim}")
            layers: list[nn.Module] = [nn.Identity()]
        elif kind == "linear":
            layers = [nn.Linear(in_dim, out_dim, **dd)]
        elif (match := _MLP.match(kind)) is not None and int(match.group(1)) >= 1:
            layers = [nn.Linear(in_dim, out_dim, **dd)]
            for _ in range(int(match.group(1)) - 1):
                layers += [nn.GELU(), nn.Linear(out_dim, out_dim, **dd)]
        else:
            raise ValueError(
                f"{where}: kind expected 'linear', 'identity' or 'mlp{{N}}x_gelu' with N >= 1, got {kind!r}"
            )
        super().__init__(*layers)
        self.kind, self.in_dim, self.out_dim = kind, in_dim, out_dim

    def reset_parameters(self) -> None:
        for layer in self:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()

    def get_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_dim": self.in_dim, "out_dim": self.out_dim}

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, in_dim={self.in_dim}, out_dim={self.out_dim}"

    def forward(self, x: Tensor) -> Tensor:
        where = "Projector.forward"
        if not isinstance(x, Tensor):
            raise TypeError(f"{where}: x expected a torch.Tensor (*, {self.in_dim}), got {type(x).__name__}")
        check_module_inputs(where, self, x=x)
        if x.ndim == 0 or x.shape[-1] != self.in_dim:
            raise ValueError(f"{where}: x expected shape (*, {self.in_dim}), got {tuple(x.shape)}")
        return super().forward(x)


def build_projector(
    kind: str,
    in_dim: int,
    out_dim: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Projector:
    """LLaVA's ``build_vision_projector`` by ``mm_projector_type`` string; see [`Projector`][layerfuse.Projector]."""
    return Projector(kind, in_dim, out_dim, device=device, dtype=dtype)
