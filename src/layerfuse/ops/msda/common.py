"""Inputs and the backend interface of multi-scale deformable attention sampling."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..backends import Backend

__all__ = ["MSDABackend", "MSDAInputs", "normalize_spatial_shapes"]

_WHERE = "ms_deform_attn"


def normalize_spatial_shapes(spatial_shapes: object) -> tuple[tuple[int, int], ...]:
    """(H_l, W_l) pairs as python ints, from a sequence of pairs or an (L, 2) integer tensor."""
    if isinstance(spatial_shapes, Tensor):
        if spatial_shapes.dtype.is_floating_point or spatial_shapes.dtype.is_complex or spatial_shapes.dtype == torch.bool:
            raise TypeError(f"{_WHERE}: spatial_shapes expected an integer tensor, got dtype={spatial_shapes.dtype}")
        if spatial_shapes.ndim != 2 or spatial_shapes.shape[1] != 2:
            raise ValueError(
                f"{_WHERE}: spatial_shapes expected an (L, 2) tensor of (H, W), got shape {tuple(spatial_shapes.shape)}"
            )
        spatial_shapes = spatial_shapes.tolist()
    if isinstance(spatial_shapes, (str, bytes)) or not isinstance(spatial_shapes, Sequence):
        raise TypeError(
            f"{_WHERE}: spatial_shapes expected a sequence of (H, W) int pairs or an (L, 2) int tensor, "
            f"got {type(spatial_shapes).__name__}"
        )
    shapes = []
    for i, pair in enumerate(spatial_shapes):
        if (
            not isinstance(pair, Sequence)
            or len(pair) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair)
        ):
            raise TypeError(f"{_WHERE}: spatial_shapes[{i}] expected an (H, W) pair of ints, got {pair!r}")
        if pair[0] <= 0 or pair[1] <= 0:
            raise ValueError(f"{_WHERE}: spatial_shapes[{i}] expected positive (H, W), got {tuple(pair)}")
        shapes.append((int(pair[0]), int(pair[1])))
    if not shapes:
        raise ValueError(f"{_WHERE}: spatial_shapes expected at least one level, got none")
    return tuple(shapes)


@dataclass(frozen=True)
class MSDAInputs:
    """The arguments of one [`layerfuse.ops.ms_deform_attn`][layerfuse.ops.ms_deform_attn] call.

    Attributes:
        value: (B, S, M, D), S = sum of H_l·W_l, levels concatenated in order, each row-major.
        spatial_shapes: (H_l, W_l) for each of the L levels.
        sampling_locations: (B, Nq, M, L, P, 2), normalised (x, y).
        attention_weights: (B, Nq, M, L, P).
    """

    value: Tensor
    spatial_shapes: tuple[tuple[int, int], ...]
    sampling_locations: Tensor
    attention_weights: Tensor

    @property
    def device(self) -> torch.device:
        return self.value.device

    @property
    def dtype(self) -> torch.dtype:
        return self.value.dtype

    def describe(self) -> str:
        return (
            f"value={tuple(self.value.shape)} {self.value.dtype}, spatial_shapes={list(self.spatial_shapes)}, "
            f"sampling_locations={tuple(self.sampling_locations.shape)} {self.sampling_locations.dtype}, "
            f"attention_weights={tuple(self.attention_weights.shape)} {self.attention_weights.dtype}, "
            f"device={self.value.device}"
        )

    def validate(self) -> None:
        """Raise ``TypeError``/``ValueError`` naming what is wrong and printing every input's shape."""
        named = {
            "value": self.value,
            "sampling_locations": self.sampling_locations,
            "attention_weights": self.attention_weights,
        }
        for name, t in named.items():
            if not isinstance(t, Tensor):
                raise TypeError(f"{_WHERE}: {name} expected a Tensor, got {type(t).__name__}")
            if not t.dtype.is_floating_point:
                raise TypeError(f"{_WHERE}: {name} expected a floating-point tensor, got dtype={t.dtype}")
        devices = {name: t.device for name, t in named.items()}
        if len(set(devices.values())) > 1:
            raise ValueError(f"{_WHERE}: all tensors must be on one device, got {devices}")

        def fail(problem: str) -> None:
            raise ValueError(f"{_WHERE}: {problem}; got {self.describe()}")

        if self.value.ndim != 4:
            fail("value expected 4 dims (B, S, M, D)")
        if self.sampling_locations.ndim != 6 or self.sampling_locations.shape[-1] != 2:
            fail("sampling_locations expected shape (B, Nq, M, L, P, 2)")
        b, s, m, _ = self.value.shape
        lb, _, lm, ll, _, _ = self.sampling_locations.shape
        num_levels = len(self.spatial_shapes)
        total = sum(h * w for h, w in self.spatial_shapes)
        if s != total:
            fail(f"value has S={s} rows but spatial_shapes cover sum(H*W)={total}")
        if lb != b:
            fail(f"sampling_locations batch {lb} != value batch {b}")
        if lm != m:
            fail(f"sampling_locations heads {lm} != value heads {m}")
        if ll != num_levels:
            fail(f"sampling_locations has {ll} levels but spatial_shapes has {num_levels}")
        if self.attention_weights.shape != self.sampling_locations.shape[:-1]:
            fail(
                f"attention_weights expected shape {tuple(self.sampling_locations.shape[:-1])} "
                "(sampling_locations without its last axis)"
            )


class MSDABackend(Backend[MSDAInputs]):
    """One implementation of the op: declares what it supports and how to run.

    ``not_supported_reasons`` returns an empty list when the backend can run the inputs, otherwise
    one line per problem, each saying what came in and what is supported. Backends are registered as
    instances with [`layerfuse.ops.msda.register_backend`][layerfuse.ops.msda.register_backend].
    """

    def not_supported_reasons(self, inputs: MSDAInputs) -> list[str]:
        dtypes = (inputs.value.dtype, inputs.sampling_locations.dtype, inputs.attention_weights.dtype)
        return self.device_dtype_reasons(inputs.device, dtypes)

    @abstractmethod
    def apply(self, inputs: MSDAInputs) -> Tensor:
        """Run the op on validated inputs; returns (B, Nq, M·D) in ``inputs.value.dtype``."""
