"""The public [`attention`][layerfuse.ops.attention.attention] op: validate, pick a backend, make fully masked rows zero."""

from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import AttentionInputs, apply_backend, select_backend

__all__ = ["attention"]


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    r"""Multi-head scaled dot-product attention, dispatched to the best available kernel.

    Tensors are laid out **(B, heads, N, D)** as in ``F.scaled_dot_product_attention`` (xformers
    uses (B, N, heads, D); the ``"xformers"`` backend converts). Equivalent plain PyTorch code (the
    ``"eager"`` backend):

    ```python
    def attention(q, k, v, mask=None, dropout_p=0.0, scale=None):
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        scores = (q.float() @ k.float().transpose(-2, -1)) * scale
        if mask is not None and mask.dtype == torch.bool:
            keep = mask.any(-1, keepdim=True)          # rows with at least one key
            scores = scores.masked_fill(~(mask | ~keep), float("-inf"))
        elif mask is not None:
            keep = (mask > float("-inf")).any(-1, keepdim=True)
            scores = scores + mask.float().masked_fill(~keep, 0.0)
        weights = torch.dropout(scores.softmax(-1), dropout_p, train=True)
        out = (weights @ v.float()).to(q.dtype)
        return out if mask is None else out.masked_fill(~keep, 0.0)
    ```

    **Fully masked query rows** (no key to attend to) return zeros, with zero gradient, on every
    backend. They are computed as if unmasked and then zeroed, so no NaN appears in the forward or
    the backward pass.

    **Non-finite input** gives the same NaN on every backend: a query row holding NaN or ±Inf
    returns NaN in that row (the eager formula's result; PyTorch's fused CPU SDPA kernel alone would
    return 0 there, so the row is set to NaN after the kernel), and a NaN key or value, or a NaN in an
    additive mask, reaches the outputs it enters as in the eager formula. Fully masked rows stay 0.

    **Precision**: the eager backend accumulates scores, softmax and the weighted sum in float32
    under bfloat16/float16 (float64 stays float64); the fused SDPA and xformers kernels accumulate
    in float32 internally.

    Args:
        q: queries (B, H, Nq, D).
        k: keys (B, H, Nk, D).
        v: values (B, H, Nk, Dv).
        mask: ``None``; a **bool** tensor, True where a query may attend to a key; or a **floating**
            tensor added to the scores (``-inf`` excludes a key; cast to the query dtype for the
            fused kernels). Its shape is either 2-d (Nq, Nk) or 4-d (B, H, Nq, Nk), and any axis may
            be 1 to broadcast, e.g. a key-padding mask (B, 1, 1, Nk). 3-d masks are rejected as
            ambiguous.
        dropout_p: probability of dropping an attention weight; applied whenever it is > 0, so pass
            ``p if self.training else 0.0`` from a module.
        scale: factor on q·kᵀ. Default: ``D ** -0.5``.
        backend: ``"auto"``, ``"sdpa"``, ``"xformers"``, ``"eager"`` or a name given to
            [`register_backend`][layerfuse.ops.attention.register_backend]. ``"auto"`` tries SDPA, then xformers on CUDA, then eager, and
            takes the first that supports the device, dtype, head size and mask. A backend named
            explicitly never falls back: if it cannot run the inputs a ``ValueError`` says why.

    Returns:
        (B, H, Nq, Dv) in the dtype of ``q``.

    Raises:
        TypeError: non-tensor or non-floating inputs, mixed dtypes, a mask of another dtype.
        ValueError: inconsistent shapes (the message prints every shape), tensors on different
            devices, an unknown backend, or a named backend that cannot run the inputs.

    Examples:
        >>> q = torch.randn(2, 8, 576, 64)
        >>> kv = torch.randn(2, 8, 4 * 576, 64)
        >>> attention(q, kv, kv).shape
        torch.Size([2, 8, 576, 64])
    """
    inputs = AttentionInputs(q, k, v, mask, dropout_p, scale)
    inputs.validate()
    chosen = select_backend(inputs, backend)
    if mask is None:
        return apply_backend(chosen, inputs)
    # Rows without any key are run unmasked (finite everywhere, also in backward) and zeroed after, so
    # every backend returns the same zeros instead of its own NaN or garbage.
    if mask.dtype == torch.bool:
        keep = mask.any(dim=-1, keepdim=True)
        safe = mask | ~keep
    else:
        keep = (mask > float("-inf")).any(dim=-1, keepdim=True)
        safe = mask.masked_fill(~keep, 0.0)
    out = apply_backend(chosen, AttentionInputs(q, k, v, safe, dropout_p, scale))
    return out.masked_fill(~keep, 0.0)
