"""The ``"eager"`` backend: attention written out in plain PyTorch, the reference every backend matches.

It materialises the (B, H, Nq, Nk) score matrix, so it is the slowest and most memory-hungry backend;
it runs on every device and dtype and is what the tests compare the fused kernels with.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import AttentionBackend, AttentionInputs

__all__ = ["EagerBackend", "eager_attention"]


def eager_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> Tensor:
    """softmax(q·kᵀ·scale + mask)·v with the scores, softmax and weighted sum in float32.

    float64 inputs stay in float64; bfloat16/float16 inputs are upcast and the result cast back. Takes
    validated inputs; fully masked rows give NaN here (the public op zeroes them before calling).
    """
    compute = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.to(compute) @ k.to(compute).transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(compute)
    weights = scores.softmax(dim=-1)
    if dropout_p > 0:
        weights = torch.dropout(weights, dropout_p, train=True)
    return (weights @ v.to(compute)).to(q.dtype)


class EagerBackend(AttentionBackend):
    name = "eager"

    def apply(self, inputs: AttentionInputs) -> Tensor:
        return eager_attention(
            inputs.query, inputs.key, inputs.value, mask=inputs.mask, dropout_p=inputs.dropout_p, scale=inputs.scale
        )
