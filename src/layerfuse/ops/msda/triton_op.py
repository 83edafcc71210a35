"""Triton backend: launchers, the ``layerfuse::ms_deform_attn_*`` custom ops, fake kernels, autograd.

The kernels (`triton_kernels`) are imported on first use, so this module (and layerfuse)
imports without Triton or CUDA. Both directions are ``torch.library`` ops with shape-only fake
kernels, so ``torch.compile`` and ``torch.export`` trace through them; with
``torch.library.triton_op`` (feature-detected) Inductor also sees the kernels themselves.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor

from ..._optional import install_hint, is_available
from .common import MSDABackend, MSDAInputs
from .reference import ms_deform_attn_pytorch

__all__ = ["TritonBackend", "ms_deform_attn_backward", "ms_deform_attn_forward"]

# Elements of one (BLOCK_Q, BLOCK_D) tile: keeps the backward's gradient tile plus one corner tile
# in registers for head dims up to 256.
_TILE_FORWARD = 4096
_TILE_BACKWARD = 2048
_MAX_HEAD_DIM = 256


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _acc_dtype(*tensors: Tensor) -> object:
    import triton.language as tl

    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


def _level_tables(spatial_shapes: list[int], device: torch.device) -> tuple[Tensor, Tensor]:
    """(L·2,) int32 (H, W) pairs and (L,) int32 start rows of each level, on ``device``."""
    areas = [h * w for h, w in zip(spatial_shapes[0::2], spatial_shapes[1::2])]
    starts = [sum(areas[:i]) for i in range(len(areas))]
    shapes = torch.tensor(spatial_shapes, dtype=torch.int32, device=device)
    return shapes, torch.tensor(starts, dtype=torch.int32, device=device)


def _grid(batch: int, num_queries: int, num_heads: int, block_q: int) -> tuple[int, int]:
    return (batch * -(-num_queries // block_q), num_heads)


def _custom_op(name: str) -> Callable[[Callable], object]:
    """``triton_op`` where this torch has it, Triton is installed and a GPU is present (Inductor then
    sees the kernels), else an opaque ``custom_op``. ``triton_op`` imports Inductor (about 2 s) and,
    without Triton, logs a warning, so CPU-only installs (where the kernels run only under the
    interpreter, for tests) keep the cheap registration."""
    if hasattr(torch.library, "triton_op") and is_available("triton") and torch.cuda.is_available():
        return lambda fn: torch.library.triton_op(name, fn, mutates_args=())
    return lambda fn: torch.library.custom_op(name, fn, mutates_args=())


def _wrap(kernel: object) -> object:
    return torch.library.wrap_triton(kernel) if hasattr(torch.library, "wrap_triton") else kernel


@_custom_op("layerfuse::ms_deform_attn_forward")
def ms_deform_attn_forward(
    value: Tensor, spatial_shapes: list[int], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """(B, S, M, D), flat [H_0, W_0, H_1, ...], (B, Nq, M, L, P, 2), (B, Nq, M, L, P) -> (B, Nq, M·D)."""
    from .triton_kernels import msda_forward_kernel

    value, loc, attn = value.contiguous(), sampling_locations.contiguous(), attention_weights.contiguous()
    b, s, m, d = value.shape
    _, nq, _, num_levels, num_points, _ = loc.shape
    shapes, starts = _level_tables(spatial_shapes, value.device)
    out = value.new_empty(b, nq, m * d)
    if out.numel() == 0:  # B = 0 or no queries: a launch grid of size 0 is an error
        return out
    block_d = _next_power_of_2(d)
    block_q = max(1, min(64, _TILE_FORWARD // block_d))
    _wrap(msda_forward_kernel)[_grid(b, nq, m, block_q)](
        value, shapes, starts, loc, attn, out, s, nq, m, d,
        NUM_LEVELS=num_levels, NUM_POINTS=num_points, BLOCK_Q=block_q, BLOCK_D=block_d,
        ACC_DTYPE=_acc_dtype(value, loc, attn),
    )
    return out


@ms_deform_attn_forward.register_fake
def _forward_fake(
    value: Tensor, spatial_shapes: list[int], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    b, _, m, d = value.shape
    return value.new_empty(b, sampling_locations.shape[1], m * d)


@_custom_op("layerfuse::ms_deform_attn_backward")
def ms_deform_attn_backward(
    grad_out: Tensor, value: Tensor, spatial_shapes: list[int], sampling_locations: Tensor, attention_weights: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `ms_deform_attn_forward` wrt value, sampling_locations, attention_weights."""
    from .triton_kernels import msda_backward_kernel

    value, loc, attn = value.contiguous(), sampling_locations.contiguous(), attention_weights.contiguous()
    grad_out = grad_out.contiguous()
    b, s, m, d = value.shape
    _, nq, _, num_levels, num_points, _ = loc.shape
    shapes, starts = _level_tables(spatial_shapes, value.device)
    acc = torch.float64 if torch.float64 in (value.dtype, loc.dtype, attn.dtype, grad_out.dtype) else torch.float32
    # Atomic adds accumulate in the compute dtype; cast to value's dtype once at the end.
    grad_value = torch.zeros(value.shape, dtype=acc, device=value.device)
    grad_loc = torch.empty_like(loc)
    grad_attn = torch.empty_like(attn)
    if grad_attn.numel() == 0:
        return grad_value.to(value.dtype), grad_loc, grad_attn
    block_d = _next_power_of_2(d)
    block_q = max(1, min(32, _TILE_BACKWARD // block_d))
    _wrap(msda_backward_kernel)[_grid(b, nq, m, block_q)](
        value, shapes, starts, loc, attn, grad_out, grad_value, grad_loc, grad_attn, s, nq, m, d,
        NUM_LEVELS=num_levels, NUM_POINTS=num_points, BLOCK_Q=block_q, BLOCK_D=block_d,
        ACC_DTYPE=_acc_dtype(value, loc, attn, grad_out),
    )
    return grad_value.to(value.dtype), grad_loc, grad_attn


@ms_deform_attn_backward.register_fake
def _backward_fake(
    grad_out: Tensor, value: Tensor, spatial_shapes: list[int], sampling_locations: Tensor, attention_weights: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs, output) -> None:
    value, spatial_shapes, sampling_locations, attention_weights = inputs
    ctx.spatial_shapes = spatial_shapes
    ctx.save_for_backward(value, sampling_locations, attention_weights)


def _backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None, Tensor | None, Tensor | None]:
    value, loc, attn = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True: the kernel's gradients are not differentiable, so they are taken from
        # the PyTorch path (same values), whose own backward is differentiable.
        shapes = tuple(zip(ctx.spatial_shapes[0::2], ctx.spatial_shapes[1::2]))
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3])
        wrt = [t for t, need in zip((value, loc, attn), needs) if need]
        grads = iter(torch.autograd.grad(
            ms_deform_attn_pytorch(value, shapes, loc, attn), wrt, grad_out, create_graph=True
        ))
        grad_value, grad_loc, grad_attn = (next(grads) if need else None for need in needs)
        return grad_value, None, grad_loc, grad_attn
    grad_value, grad_loc, grad_attn = ms_deform_attn_backward(grad_out, value, ctx.spatial_shapes, loc, attn)
    return grad_value, None, grad_loc, grad_attn


ms_deform_attn_forward.register_autograd(_backward, setup_context=_setup_context)


class TritonBackend(MSDABackend):
    """The Triton kernels: CUDA tensors, or CPU tensors under the Triton interpreter
    (``TRITON_INTERPRET=1`` set before Triton is first imported; for tests, very slow)."""

    name = "triton"
    SUPPORTED_DEVICES = frozenset({"cuda"})
    SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})

    def supports_device(self, device: torch.device) -> bool:
        return device.type == "cuda" or (device.type == "cpu" and _interpreter_enabled())

    def supported_devices_text(self) -> str:
        return "cuda; cpu only under the Triton interpreter, TRITON_INTERPRET=1"

    def unavailable_reason(self) -> str | None:
        return None if is_available("triton") else f"triton is not installed ({install_hint('triton')})"

    def not_supported_reasons(self, inputs: MSDAInputs) -> list[str]:
        reasons = super().not_supported_reasons(inputs)
        head_dim = inputs.value.shape[-1]
        if head_dim > _MAX_HEAD_DIM:
            reasons.append(f"head dim D={head_dim} (supported: D <= {_MAX_HEAD_DIM})")
        return reasons

    def apply(self, inputs: MSDAInputs) -> Tensor:
        flat_shapes = [x for hw in inputs.spatial_shapes for x in hw]
        return ms_deform_attn_forward(inputs.value, flat_shapes, inputs.sampling_locations, inputs.attention_weights)


def _interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
