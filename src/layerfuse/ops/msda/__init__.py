"""Multi-scale deformable attention (MSDA) sampling, the core of Deformable-DETR and MMFuser.

Backends: ``"pytorch"`` (`reference`, every device and dtype, the test oracle) and
``"triton"`` (`triton_op`, CUDA). ``backend="auto"`` picks Triton on CUDA when it can run the
inputs and the PyTorch path otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .common import MSDABackend, MSDAInputs, normalize_spatial_shapes
from .dispatch import backend_names, get_backend, register_backend, select_backend, unregister_backend
from .reference import PyTorchBackend, ms_deform_attn_pytorch
from .triton_op import TritonBackend

__all__ = [
    "MSDABackend",
    "MSDAInputs",
    "backend_names",
    "get_backend",
    "ms_deform_attn",
    "ms_deform_attn_pytorch",
    "register_backend",
    "select_backend",
    "unregister_backend",
]

register_backend(PyTorchBackend(), fallback=True)
register_backend(TritonBackend(), auto_devices=("cuda",))


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Sequence[tuple[int, int]] | Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    backend: str = "auto",
) -> Tensor:
    r"""Multi-scale deformable attention sampling (parameter-free).

    For every batch b, query q and head m, samples each level l of ``value`` bilinearly at P points
    and sums the samples weighted by ``attention_weights``. Sampling follows
    ``grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)`` at ``2·loc − 1``:
    (0, 0) is the top-left corner of a map and (1, 1) its bottom-right corner, pixel centres sit at
    ((i + 0.5)/W, (j + 0.5)/H), and the parts of the bilinear footprint outside a map contribute 0
    (so a location one pixel or more outside gives 0). Sampling and the weighted sum accumulate in
    float32 when the inputs are bfloat16/float16 (float64 stays float64), as the authors' CUDA op does
    after its float32 cast; the result is returned in ``value.dtype``. A sample at a NaN or ±Inf
    location makes its (query, head) output NaN, as ``grid_sample`` does; B = 0 or Nq = 0 gives an
    empty result. Second derivatives are exact on every backend (``gradgradcheck``-ed in float64).
    At a pixel centre the location gradient is a one-sided derivative (the interpolant has a kink
    there), which may be the other side than ``grid_sample``'s.

    Equivalent plain PyTorch code (the straightforward form; the ``"pytorch"`` backend computes the
    same thing faster and with less memory):

    ```python
    import torch
    import torch.nn.functional as F

    def ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights):
        B, S, M, D = value.shape
        _, Nq, _, L, P, _ = sampling_locations.shape
        levels = value.split([h * w for h, w in spatial_shapes], dim=1)
        grids = 2 * sampling_locations - 1
        samples = []
        for l, (h, w) in enumerate(spatial_shapes):
            v = levels[l].flatten(2).transpose(1, 2).reshape(B * M, D, h, w)
            g = grids[:, :, :, l].transpose(1, 2).flatten(0, 1)  # (B*M, Nq, P, 2)
            samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
        samples = torch.stack(samples, dim=-2).flatten(-2)  # (B*M, D, Nq, L*P)
        weights = attention_weights.transpose(1, 2).reshape(B * M, 1, Nq, L * P)
        out = (samples * weights).sum(-1).view(B, M * D, Nq)
        return out.transpose(1, 2).contiguous()  # (B, Nq, M*D)
    ```

    Args:
        value: (B, S, M, D) values of M heads of width D, S = sum of H_l·W_l, the L levels
            concatenated in order, each flattened row-major.
        spatial_shapes: (H_l, W_l) of each level, as python ints (what ``torch.compile`` sees as
            constants) or an (L, 2) integer tensor (read back to the host once).
        sampling_locations: (B, Nq, M, L, P, 2) normalised (x, y) sampling points; values outside
            [0, 1] are allowed and sample zeros beyond the map.
        attention_weights: (B, Nq, M, L, P) weight of each sample, already normalised by the caller
            (MMFuser applies a softmax over L·P).
        backend: ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"pytorch"``, ``"triton"`` or a
            name given to [`register_backend`][layerfuse.ops.msda.register_backend]. An explicitly named backend that cannot run the
            inputs raises ``ValueError`` listing why; only ``"auto"`` falls back.

    Returns:
        (B, Nq, M·D) tensor in ``value.dtype``; head m occupies channels [m·D, (m+1)·D).

    Raises:
        TypeError: a non-tensor or non-floating input, or malformed ``spatial_shapes``.
        ValueError: inconsistent shapes (the message prints every input's shape), tensors on
            different devices, an unknown backend, or a named backend that cannot run the inputs.

    Examples:
        >>> value = torch.randn(2, 4 * 24 * 24, 16, 64)
        >>> loc = torch.rand(2, 576, 16, 4, 4, 2)
        >>> weights = torch.rand(2, 576, 16, 4, 4).flatten(-2).softmax(-1).unflatten(-1, (4, 4))
        >>> ms_deform_attn(value, [(24, 24)] * 4, loc, weights).shape
        torch.Size([2, 576, 1024])
    """
    inputs = MSDAInputs(value, normalize_spatial_shapes(spatial_shapes), sampling_locations, attention_weights)
    inputs.validate()
    return select_backend(inputs, backend).apply(inputs)
