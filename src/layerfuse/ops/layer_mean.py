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
    where = "layer_mean"
    if isinstance(tensors, Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"{where}: tensors expected a sequence (list or tuple) of tensors, got {type(tensors).__name__}")
    if len(tensors) == 0:
        raise ValueError(f"{where}: tensors expected at least one tensor, got an empty sequence")
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = f"dtype {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"{where}: tensors[{i}] expected a floating-point tensor, got {got}")
        if t.shape != tensors[0].shape or t.device != tensors[0].device:
            raise ValueError(
                f"{where}: tensors[{i}] has shape {tuple(t.shape)} on {t.device} but tensors[0] has "
                f"{tuple(tensors[0].shape)} on {tensors[0].device}; the mean needs one shape and device"
            )
    acc = accumulation_dtype(tensors[0].dtype)
    # One accumulator, added into in place (autograd-safe: neither op saves its input); a bf16 addend
    # is promoted per element inside the kernel, never copied to float32 as a whole.
    total = tensors[0].to(acc, copy=True)
    for t in tensors[1:]:
        total.add_(t)
    total.div_(len(tensors))
    return total.to(out_dtype if out_dtype is not None else tensors[0].dtype)
