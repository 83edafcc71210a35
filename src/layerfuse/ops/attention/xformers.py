"""The ``"xformers"`` backend: ``xformers.ops.memory_efficient_attention`` (CUDA only).

Optional (the ``xformers`` extra) and imported only when a CUDA call selects it, so
CPU installs never import xformers. xformers lays tensors out (B, N, H, D) and takes masks as an
additive bias; both conversions happen here.
"""

# b batch, h heads, n tokens, d head dim

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from ..._optional import install_hint, is_available, require
from .dispatch import AttentionBackend, AttentionInputs

__all__ = ["XFormersBackend"]


def _additive_bias(mask: Tensor, shape: tuple[int, int, int, int], dtype: torch.dtype) -> Tensor:
    """The mask as a dense additive bias of ``shape`` whose rows start at multiples of 8 elements.

    xformers' kernels read the bias with vector loads and reject a row stride that is not a multiple
    of 8, so the bias lives in a padded buffer and is handed over as a view.
    """
    b, h, nq, nk = shape
    padded = torch.empty(b, h, nq, -(-nk // 8) * 8, device=mask.device, dtype=dtype)
    bias = padded[..., :nk]
    if mask.dtype == torch.bool:
        bias.copy_(torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf")).expand(shape))
    else:
        bias.copy_(mask.to(dtype).expand(shape))
    return bias


class XFormersBackend(AttentionBackend):
    name = "xformers"
    SUPPORTED_DEVICES = frozenset({"cuda"})
    SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})

    def unavailable_reason(self) -> str | None:
        if is_available("xformers"):
            return None
        return f"xformers is not installed ({install_hint('xformers')})"

    def apply(self, inputs: AttentionInputs) -> Tensor:
        xops = require("xformers.ops", extra="xformers", purpose="attention(backend='xformers')")
        q, k, v = (rearrange(t, "b h n d -> b n h d") for t in (inputs.query, inputs.key, inputs.value))
        bias = None
        if inputs.mask is not None:
            b, h, nq, _ = inputs.query.shape
            bias = _additive_bias(inputs.mask, (b, h, nq, inputs.key.shape[2]), inputs.dtype)
        out = xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=inputs.dropout_p, scale=inputs.scale)
        return rearrange(out, "b n h d -> b h n d")
