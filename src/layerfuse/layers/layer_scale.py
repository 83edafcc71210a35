"""Per-channel learnable scale, zero-initialised so a residual branch starts switched off."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import check_float, check_module_inputs, check_positive_int, check_tensor, factory_kwargs

__all__ = ["LayerScale"]


class LayerScale(nn.Module):
    r"""Multiply the last axis by a learnable vector ``gamma``.

    With ``init_value=0`` (the default) a residual branch ``x + LayerScale(f(x))`` is the identity at
    initialisation, so a fuser placed in front of a pretrained projector starts by reproducing the
    single-layer baseline exactly (MMFuser's and CaiT's layer-scale).

    Args:
        dim: channels C.
        init_value: initial value of every entry of ``gamma``. Default: ``0.0``

    Shape:
        - input: (\*, C); output: (\*, C)
    """

    dim: int
    init_value: float

    def __init__(
        self,
        dim: int,
        init_value: float = 0.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.dim = check_positive_int("LayerScale", "dim", dim)
        self.init_value = check_float("LayerScale", "init_value", init_value)
        self.gamma = nn.Parameter(torch.empty(dim, **factory_kwargs("LayerScale", device, dtype)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_value)

    def forward(self, x: Tensor) -> Tensor:
        # a float64 input times float32 gamma promotes, as PyTorch does; only the device must agree
        check_module_inputs("LayerScale.forward", self, x=x, any_dtype=("x",))
        check_tensor("LayerScale.forward", "x", x, shape=f"(*, {self.dim})", last=self.dim)
        return x * self.gamma

    def extra_repr(self) -> str:
        return f"dim={self.dim}, init_value={self.init_value}"
