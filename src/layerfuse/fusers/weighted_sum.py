"""Learnable weighted sum over layers, optionally after a per-layer LayerNorm + Linear (COMM's
LLN-Layerscale)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .._checks import (
    check_bool,
    check_choice,
    check_feature_list,
    check_float,
    check_float_list,
    check_positive_int,
    check_same_tokens,
    check_widths,
    factory_kwargs,
)
from ..ops.layer_mean import accumulation_dtype
from .base import Fuser
from .packed import fuse_packed, is_packed

__all__ = ["WeightedSumFuser"]

# l layers, c input channels, p per-layer projection width

NORMALIZE_MODES = ("softmax", "none")


class WeightedSumFuser(Fuser):
    r"""``sum_l w_l * f_l(features[l])`` with learnable layer weights ``w``.

    - ``normalize="softmax"``: ``w = softmax(layer_weights)``, so the weights are positive and sum to 1
      (COMM's "Layerscale" whose weights "sum to 1").
    - ``normalize="none"``: ``w = layer_weights``, a free layer-scale (COMM's recommendation, specs §6.3).

    With ``layer_proj=True``, ``f_l(x) = Linear_l(LayerNorm_l(x))`` (COMM's LLN-Layerscale, in the
    paper's order: LayerNorm first); otherwise ``f_l`` is the identity. The per-layer parameters are
    stacked tensors (``norm_weight``/``norm_bias`` (L, C), ``proj_weight`` (L, P, C), ``proj_bias``
    (L, P)), each Linear initialised as ``nn.Linear`` would be; they are applied as one Linear over the
    concatenated normalised layers with the layer weights folded into it (the same function, one GEMM).

    The weights start as the uniform mean ``1/L`` (zero logits under softmax) unless ``init_weights``
    says otherwise, so the fuser starts as a plain layer average. The softmax and the plain weighted
    sum run in float32 under bf16/fp16 (float64 stays float64); with ``layer_proj`` the sum happens
    inside the matrix product, which accumulates in float32.

    Args:
        dim: channel width C of every input.
        num_inputs: number of layers L.
        normalize: ``"softmax"`` or ``"none"``. Default: ``"softmax"``
        layer_proj: put a LayerNorm + Linear on each layer before weighting (LLN-Layerscale).
            Default: ``False``
        layer_proj_dim: output width of the per-layer Linears (only with ``layer_proj``).
            Default: ``dim``
        init_weights: the initial mixing weights ``w`` (L values; positive and summing to 1 under
            softmax). Default: ``1/L`` each.
        eps: the per-layer LayerNorm epsilon. Default: ``1e-5``

    Shape:
        - features: ``num_inputs`` tensors (B, N, C); output: (B, N, C), or (B, N, layer_proj_dim)
          with ``layer_proj``

    Examples:
        >>> comm_clip = WeightedSumFuser(1024, 24, normalize="none", layer_proj=True)
        >>> comm_clip([torch.randn(2, 576, 1024) for _ in range(24)]).shape
        torch.Size([2, 576, 1024])
    """

    dim: int
    normalize: str
    layer_proj_dim: int | None
    init_weights: tuple[float, ...] | None
    eps: float

    def __init__(
        self,
        dim: int,
        num_inputs: int,
        *,
        normalize: str = "softmax",
        layer_proj: bool = False,
        layer_proj_dim: int | None = None,
        init_weights: Sequence[float] | None = None,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        where = "WeightedSumFuser"
        dd: dict[str, Any] = factory_kwargs(where, device, dtype)
        self.dim = check_positive_int(where, "dim", dim)
        check_positive_int(where, "num_inputs", num_inputs)
        check_choice(where, "normalize", normalize, NORMALIZE_MODES)
        check_bool(where, "layer_proj", layer_proj)
        eps = check_float(where, "eps", eps, low=0.0, low_open=True)
        if layer_proj_dim is not None:
            if not layer_proj:
                raise ValueError(f"{where}: layer_proj_dim={layer_proj_dim} needs layer_proj=True")
            check_positive_int(where, "layer_proj_dim", layer_proj_dim)
        elif layer_proj:
            layer_proj_dim = self.dim
        if init_weights is not None:
            init_weights = check_float_list(where, "init_weights", init_weights, length=num_inputs)
            if normalize == "softmax" and (
                min(init_weights) <= 0 or not math.isclose(sum(init_weights), 1.0, rel_tol=1e-6)
            ):
                raise ValueError(
                    f"{where}: init_weights under normalize='softmax' must be positive and sum to 1, "
                    f"got {list(init_weights)}"
                )
        self.normalize, self.layer_proj_dim, self.init_weights, self.eps = (
            normalize,
            layer_proj_dim,
            init_weights,
            eps,
        )
        self.in_dims = (self.dim,) * num_inputs
        self.out_dim = self.dim if layer_proj_dim is None else layer_proj_dim
        self.layer_weights = nn.Parameter(torch.empty(num_inputs, **dd))
        if layer_proj_dim is None:
            for name in ("norm_weight", "norm_bias", "proj_weight", "proj_bias"):
                self.register_parameter(name, None)
        else:
            self.norm_weight = nn.Parameter(torch.empty(num_inputs, self.dim, **dd))
            self.norm_bias = nn.Parameter(torch.empty(num_inputs, self.dim, **dd))
            self.proj_weight = nn.Parameter(torch.empty(num_inputs, layer_proj_dim, self.dim, **dd))
            self.proj_bias = nn.Parameter(torch.empty(num_inputs, layer_proj_dim, **dd))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        num = self.num_inputs
        init = torch.tensor(self.init_weights or [1.0 / num] * num, dtype=torch.float64)  # exact 1/L in float64 modules
        with torch.no_grad():
            # softmax(log w) = w for positive w summing to 1; the uniform mean gives zero logits
            self.layer_weights.copy_(init.log() - init.log().mean() if self.normalize == "softmax" else init)
        if self.proj_weight is not None:
            nn.init.ones_(self.norm_weight)
            nn.init.zeros_(self.norm_bias)
            bound = 1.0 / math.sqrt(self.dim)
            for layer in range(num):
                # each layer's Linear gets nn.Linear's own init (kaiming_uniform a=sqrt(5), bias U(+-1/sqrt(fan_in)))
                nn.init.kaiming_uniform_(self.proj_weight[layer], a=math.sqrt(5))
            nn.init.uniform_(self.proj_bias, -bound, bound)

    def mixing_weights(self) -> Tensor:
        """The effective per-layer weights ``w`` (L,), in float32 (float64 for a float64 module)."""
        raw = self.layer_weights.to(accumulation_dtype(self.layer_weights.dtype))
        return torch.softmax(raw, dim=0) if self.normalize == "softmax" else raw

    def forward(
        self,
        features: Sequence[Tensor],
        grid: Sequence[int] | None = None,
        level_grids: Sequence[Sequence[int]] | None = None,
        *,
        text: Tensor | None = None,
    ) -> Tensor:
        """Fuse `features`; `grid` and `level_grids` are accepted when they fit the tokens (see
        [`Fuser`][layerfuse.Fuser]), `text` is refused."""
        where = "WeightedSumFuser.forward"
        if is_packed(features):  # token-wise: the packed sequence as a batch of one
            return fuse_packed(where, self.forward, features, out_dim=self.out_dim, text=text)
        grid = self._call_args(where, features, grid, text)
        feats = check_feature_list(where, features, length=self.num_inputs)
        check_widths(where, feats, self.in_dims)
        tokens = check_same_tokens(where, feats)
        self._check_token_layout(where, features, tokens, grid, level_grids)
        w = self.mixing_weights()
        if self.proj_weight is None:
            total = feats[0].to(w.dtype) * w[0]
            for i in range(1, self.num_inputs):
                total = total + feats[i].to(w.dtype) * w[i]
            return total.to(feats[0].dtype)
        # sum_l w_l (W_l LN_l(x_l) + b_l) as one Linear over the concatenated normalised layers with
        # the weights folded in (specs §0.7): one GEMM instead of L, about twice as fast in training
        normed = [
            F.layer_norm(f, (self.dim,), self.norm_weight[i], self.norm_bias[i], self.eps) for i, f in enumerate(feats)
        ]
        weight = rearrange(self.proj_weight * w[:, None, None].to(self.proj_weight.dtype), "l p c -> p (l c)")
        bias = (self.proj_bias.to(w.dtype) * w[:, None]).sum(0).to(self.proj_bias.dtype)
        return F.linear(torch.cat(normed, dim=-1), weight, bias)

    def get_config(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "num_inputs": self.num_inputs,
            "normalize": self.normalize,
            "layer_proj": self.layer_proj_dim is not None,
            "layer_proj_dim": self.layer_proj_dim,
            "init_weights": None if self.init_weights is None else list(self.init_weights),
            "eps": self.eps,
            **self._preset_config(),
        }

    def extra_repr(self) -> str:
        text = f"dim={self.dim}, num_inputs={self.num_inputs}, normalize={self.normalize!r}"
        if self.layer_proj_dim is not None:
            text += ", layer_proj=True"
            text += f", layer_proj_dim={self.layer_proj_dim}, eps={self.eps}"
        return text
