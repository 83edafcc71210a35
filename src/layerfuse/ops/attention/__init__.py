"""Attention with one dispatch over PyTorch SDPA, xformers and a plain PyTorch reference.

Backends, one per file: ``"sdpa"`` (`sdpa`, every device; PyTorch picks flash /
memory-efficient / cuDNN / math), ``"xformers"`` (`xformers`, CUDA, optional extra) and
``"eager"`` (`eager`, the reference). `dispatch` holds the registry; `window`
builds local-window attention on top of [`attention`][layerfuse.ops.attention.attention].
"""

from __future__ import annotations

from .api import attention
from .dispatch import (
    AttentionBackend,
    AttentionInputs,
    auto_order,
    backend_names,
    get_backend,
    register_backend,
    select_backend,
    unregister_backend,
)
from .eager import EagerBackend, eager_attention
from .sdpa import SDPABackend
from .window import packed_windowed_attention, window_mask, windowed_attention
from .xformers import XFormersBackend

__all__ = [
    "AttentionBackend",
    "AttentionInputs",
    "attention",
    "auto_order",
    "backend_names",
    "eager_attention",
    "get_backend",
    "packed_windowed_attention",
    "register_backend",
    "select_backend",
    "unregister_backend",
    "window_mask",
    "windowed_attention",
]

# "auto": SDPA first everywhere (it already chooses among PyTorch's fused kernels), xformers as a CUDA
# alternative when SDPA declines, the eager reference last.
register_backend(XFormersBackend(), auto_devices=("cuda",))
register_backend(SDPABackend(), auto_devices=("cuda",), fallback=True)
register_backend(EagerBackend(), fallback=True)
