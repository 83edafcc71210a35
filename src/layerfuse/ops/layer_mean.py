"""Elementwise mean of several layers' features, accumulated in float32 under bf16/fp16."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["accumulation_dtype", "layer_mean"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype reductions run in: float32 for bf16/fp16 (and float32), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def layer_mean(tensors: Sequence[Tensor], *, out_dtype: torch.dtype | None = None) -> Tensor:
    """Mean of equally shaped tensors, summed in float32 (float64 stays float64).

    Equivalent to ``torch.stack(tensors).float().mean(0).to(out_dtype)`` without the stacked copy:
    each addend is promoted on the fly, so a bf16 layer is never materialised in float32.

    Args:
        tensors: one or more tensors of one shape (e.g. the hidden states of a layer group).
        out_dtype: dtype of the result. Default: the dtype of ``tensors[0]``; pass
            ``accumulation_dtype(x.dtype)`` to keep full precision for a later reduction.

    Returns:
        A tensor of the common shape.
    """
    if len(tensors) == 0:
        raise ValueError("layer_mean: tensors expected at least one tensor, got an empty sequence")
    acc = accumulation_dtype(tensors[0].dtype)
    # One accumulator, added into in place (autograd-safe: neither op saves its input); a bf16 addend
    # is promoted per element inside the kernel, never copied to float32 as a whole.
    total = tensors[0].to(acc, copy=True)
    for t in tensors[1:]:
        total.add_(t)
    total.div_(len(tensors))
    return total.to(out_dtype if out_dtype is not None else tensors[0].dtype)
