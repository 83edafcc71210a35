"""Multi-head attention layer (projections around [`layerfuse.ops.attention.attention`][layerfuse.ops.attention.attention]).

Leaf names ``to_q``, ``to_kv`` and ``to_out`` deliberately differ from the LLM projection names that
LoRA tooling targets by suffix (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``), so a fusion module
placed under ``mm_projector`` is never LoRA-wrapped by accident.
"""

# b batch, n query tokens, m key tokens, h heads, d head dim

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from .._checks import (
    check_bool,
    check_float,
    check_module_inputs,
    check_positive_int,
    check_tensor,
    factory_kwargs,
)
from ..ops.attention import attention, packed_windowed_attention, windowed_attention
from ..ops.attention.dispatch import check_backend_name

__all__ = ["Attention"]


class Attention(nn.Module):
    r"""Multi-head (cross- or self-) attention with an optional local window.

    ``to_q`` projects the queries, ``to_kv`` the context into keys and values, ``to_out`` the
    concatenated heads. With ``window`` the queries and every context level are token grids and each
    query attends only to its window of each level ([`windowed_attention`][layerfuse.ops.attention.windowed_attention]);
    without it every query attends to every context token.

    Args:
        dim: query width C (also the output width).
        heads: attention heads; must divide ``dim``. Default: ``8``
        context_dim: width of the keys/values source. Default: ``dim``
        qkv_bias: biases on ``to_q`` and ``to_kv``. Default: ``True``
        attn_drop: attention-weight dropout, active in training mode. Default: ``0.0``
        backend: attention backend, fixed at construction. Default: ``"auto"``

    Shape:
        - x: (B, N, C); context: (B, M, context_dim) (``None`` = self-attention); output: (B, N, C)

    Examples:
        >>> attn = Attention(256, heads=4)
        >>> attn(torch.randn(2, 64, 256), torch.randn(2, 300, 256)).shape
        torch.Size([2, 64, 256])
    """

    dim: int
    heads: int
    context_dim: int
    attn_drop: float
    backend: str

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        context_dim: int | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        where = "Attention"
        check_positive_int(where, "dim", dim)
        check_positive_int(where, "heads", heads)
        if dim % heads:
            raise ValueError(f"{where}: heads={heads} must divide dim={dim}")
        attn_drop = check_float(where, "attn_drop", attn_drop, low=0.0, high=1.0, high_open=True)
        check_bool(where, "qkv_bias", qkv_bias)
        context_dim = dim if context_dim is None else check_positive_int(where, "context_dim", context_dim)
        dd: dict[str, Any] = factory_kwargs(where, device, dtype)
        self.dim, self.heads, self.context_dim = dim, heads, context_dim
        self.attn_drop, self.backend = float(attn_drop), check_backend_name(where, backend)
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.to_kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias, **dd)
        self.to_out = nn.Linear(dim, dim, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for linear in (self.to_q, self.to_kv, self.to_out):
            nn.init.xavier_uniform_(linear.weight)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        window: int | Sequence[int] | None = None,
        query_grid: tuple[int, int] | None = None,
        context_grids: Sequence[tuple[int, int]] | None = None,
        mask: Tensor | None = None,
        packed_grids: Sequence[tuple[int, int]] | None = None,
    ) -> Tensor:
        """Attend from ``x`` to ``context`` (to ``x`` itself when ``context`` is ``None``).

        With ``window``, ``query_grid`` is the (H, W) grid of ``x`` and ``context_grids`` the grids of
        the context levels concatenated in ``context`` (default: ``[query_grid]``).

        ``mask`` (full attention only) is the ``mask=`` of [`attention`][layerfuse.ops.attention.attention],
        e.g. a (B, 1, 1, M) bool key-padding mask, True at the keys to attend to.

        ``packed_grids`` (windowed attention only) makes ``x`` (1, sum N_i, C) a packed batch of
        images with these grids, image after image, and ``context`` (1, L · sum N_i, C) the same images'
        L levels, each image's levels together and each on the image's grid; every image attends
        within itself ([`packed_windowed_attention`][layerfuse.ops.attention.packed_windowed_attention]).
        """
        where = "Attention.forward"
        check_module_inputs(where, self, x=x, context=context)
        check_tensor(where, "x", x, shape=f"(B, N, {self.dim})", ndim=3, last=self.dim)
        if context is not None:
            check_tensor(where, "context", context, shape=f"(B, M, {self.context_dim})", ndim=3, last=self.context_dim)
            if context.shape[0] != x.shape[0]:
                raise ValueError(
                    f"{where}: context has batch size {context.shape[0]} but x has {x.shape[0]}; "
                    f"got x {tuple(x.shape)}, context {tuple(context.shape)}"
                )
        context = x if context is None else context
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.to_kv(context), "b m (two h d) -> two b h m d", two=2, h=self.heads)
        dropout_p = self.attn_drop if self.training else 0.0
        if window is None:
            if packed_grids is not None:
                raise ValueError(f"{where}: packed_grids needs window (pad a packed batch and pass mask= "
                                 "for full attention)")
            out = attention(q, k, v, mask=mask, dropout_p=dropout_p, backend=self.backend)
        elif mask is not None:
            raise ValueError(f"{where}: mask is for full attention; windowed attention builds its own")
        elif packed_grids is not None:
            tokens = sum(h * w for h, w in packed_grids)
            levels = k.shape[2] // tokens if tokens else 0
            if tokens != q.shape[2] or levels * tokens != k.shape[2]:
                raise ValueError(
                    f"{where}: packed_grids {list(packed_grids)} cover {tokens} tokens per level, which does "
                    f"not fit x {tuple(x.shape)} and context {tuple(context.shape)}"
                )
            out = packed_windowed_attention(
                q, k, v, query_grids=packed_grids, key_grids=[[g] * levels for g in packed_grids],
                window=window, dropout_p=dropout_p, backend=self.backend,
            )
        else:
            if query_grid is None:
                raise ValueError("Attention.forward: window needs query_grid=(H, W)")
            out = windowed_attention(
                q, k, v, query_grid=query_grid, key_grids=context_grids or [query_grid], window=window,
                dropout_p=dropout_p, backend=self.backend,
            )
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, context_dim={self.context_dim}, "
            f"attn_drop={self.attn_drop}, backend={self.backend!r}"
        )
