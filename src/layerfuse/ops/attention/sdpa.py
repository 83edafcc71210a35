"""The ``"sdpa"`` backend: ``torch.nn.functional.scaled_dot_product_attention``.

PyTorch picks its own kernel: on CUDA FlashAttention (no mask), the memory-efficient CUTLASS kernel,
cuDNN or the math fallback; on the CPU a fused flash-style kernel (math when dropout is on). The fused
kernels never materialise the (Nq, Nk) score matrix. Narrow the choice with
``torch.nn.attention.sdpa_kernel`` around the call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import AttentionBackend, AttentionInputs

__all__ = ["SDPABackend"]


class SDPABackend(AttentionBackend):
    name = "sdpa"

    def apply(self, inputs: AttentionInputs) -> Tensor:
        mask = inputs.mask
        if mask is not None and mask.dtype != torch.bool and mask.dtype != inputs.dtype:
            # SDPA wants an additive mask in the query dtype.
            mask = mask.to(inputs.dtype)
        return F.scaled_dot_product_attention(
            inputs.query, inputs.key, inputs.value, attn_mask=mask, dropout_p=inputs.dropout_p, scale=inputs.scale
        )
