"""Inputs, backend interface and registry of [`layerfuse.ops.attention.attention`][layerfuse.ops.attention.attention].

Modelled on xformers' fMHA dispatch: every call is packed into one [`AttentionInputs`][layerfuse.ops.attention.AttentionInputs], each
backend says in words why it cannot run those inputs (``not_supported_reasons``), and
``backend="auto"`` walks a per-device priority list taking the first backend with no reasons. A
backend named explicitly is held to the same reasons and raises instead of falling back.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..backends import FLOAT_DTYPES, Backend, BackendRegistry, dtype_name

__all__ = [
    "REGISTRY",
    "AttentionBackend",
    "AttentionInputs",
    "apply_backend",
    "auto_order",
    "backend_names",
    "check_backend_name",
    "get_backend",
    "register_backend",
    "select_backend",
    "unregister_backend",
]

_WHERE = "attention"
_FLOATS = FLOAT_DTYPES


@dataclass(frozen=True)
class AttentionInputs:
    """The arguments of one [`attention`][layerfuse.ops.attention.attention] call.

    Attributes:
        query: (B, H, Nq, D).
        key: (B, H, Nk, D).
        value: (B, H, Nk, Dv).
        mask: ``None``, a bool mask (True = attend) or an additive floating mask, 2-d (Nq, Nk) or 4-d
            (B, H, Nq, Nk), every axis either full size or 1.
        dropout_p: probability of dropping an attention weight, in [0, 1).
        scale: factor applied to q·k; ``None`` means D ** -0.5.
    """

    query: Tensor
    key: Tensor
    value: Tensor
    mask: Tensor | None = None
    dropout_p: float = 0.0
    scale: float | None = None

    @property
    def device(self) -> torch.device:
        return self.query.device

    @property
    def dtype(self) -> torch.dtype:
        return self.query.dtype

    @property
    def head_dim(self) -> int:
        return self.query.shape[-1]

    @property
    def mask_kind(self) -> str:
        """``"none"``, ``"bool"`` or ``"additive"``."""
        if self.mask is None:
            return "none"
        return "bool" if self.mask.dtype == torch.bool else "additive"

    def describe(self) -> str:
        parts = [f"{n}={tuple(t.shape)}" for n, t in (("q", self.query), ("k", self.key), ("v", self.value))]
        if self.mask is not None:
            parts.append(f"mask={tuple(self.mask.shape)} {dtype_name(self.mask.dtype)}")
        parts += [f"dtype={dtype_name(self.dtype)}", f"device={self.device}", f"dropout_p={self.dropout_p}"]
        return ", ".join(parts)

    def validate(self) -> None:
        """Raise ``TypeError``/``ValueError`` naming the problem and printing every input's shape."""
        named = {"q": self.query, "k": self.key, "v": self.value}
        for name, t in named.items():
            if not isinstance(t, Tensor):
                raise TypeError(f"{_WHERE}: {name} expected a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in _FLOATS:
                raise TypeError(f"{_WHERE}: {name} expected a floating-point tensor, got dtype={t.dtype}")
        if len({t.dtype for t in named.values()}) > 1:
            raise TypeError(
                f"{_WHERE}: q, k and v must share one dtype, got "
                + ", ".join(f"{n}={dtype_name(t.dtype)}" for n, t in named.items())
            )
        if len({t.device for t in named.values()}) > 1:
            raise ValueError(
                f"{_WHERE}: q, k and v must be on one device, got "
                + ", ".join(f"{n}={t.device}" for n, t in named.items())
            )

        def fail(problem: str) -> None:
            raise ValueError(f"{_WHERE}: {problem}; got {self.describe()}")

        if any(t.ndim != 4 for t in named.values()):
            fail("q, k and v expected 4-d tensors laid out (B, heads, N, D)")
        (b, h, nq, d), (kb, kh, nk, kd) = self.query.shape, self.key.shape
        vb, vh, vn, _ = self.value.shape
        if (kb, vb) != (b, b):
            fail(f"q, k and v must share the batch size B={b}")
        if (kh, vh) != (h, h):
            fail(f"q, k and v must share the number of heads H={h}")
        if kd != d:
            fail(f"k expected head dim D={d} like q")
        if vn != nk:
            fail(f"v expected as many tokens as k (Nk={nk})")
        if nk == 0:
            fail("k and v expected at least one token")
        if isinstance(self.dropout_p, bool) or not isinstance(self.dropout_p, (int, float)):
            raise TypeError(f"{_WHERE}: dropout_p expected a float in [0, 1), got {self.dropout_p!r}")
        if not 0.0 <= self.dropout_p < 1.0:
            raise ValueError(f"{_WHERE}: dropout_p expected a float in [0, 1), got {self.dropout_p}")
        if self.scale is not None and (
            isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale)
        ):
            raise TypeError(f"{_WHERE}: scale expected None or a finite float, got {self.scale!r}")
        if self.mask is not None:
            self._validate_mask((b, h, nq, nk))

    def _validate_mask(self, full: tuple[int, int, int, int]) -> None:
        mask = self.mask
        if not isinstance(mask, Tensor):
            raise TypeError(f"{_WHERE}: mask expected None or a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool and mask.dtype not in _FLOATS:
            raise TypeError(
                f"{_WHERE}: mask expected dtype bool (True = attend) or a floating dtype (additive), "
                f"got {mask.dtype}"
            )
        if mask.device != self.device:
            raise ValueError(f"{_WHERE}: mask is on {mask.device} but q is on {self.device}")
        _, _, nq, nk = full
        if mask.ndim == 2:
            expected, target = "(Nq or 1, Nk or 1)", (nq, nk)
        elif mask.ndim == 4:
            expected, target = "(B or 1, H or 1, Nq or 1, Nk or 1)", full
        else:
            raise ValueError(
                f"{_WHERE}: mask expected 2 dims (Nq, Nk) or 4 dims (B, H, Nq, Nk); a 3-d mask is ambiguous "
                f"(heads or batch?), add the missing axis; got {self.describe()}"
            )
        if any(m not in (1, t) for m, t in zip(mask.shape, target)):
            raise ValueError(
                f"{_WHERE}: mask expected shape {expected} = {target} with any axis allowed to be 1; "
                f"got {self.describe()}"
            )


class AttentionBackend(Backend[AttentionInputs]):
    """One implementation of [`attention`][layerfuse.ops.attention.attention].

    Subclasses declare what they support in the class attributes below and implement [`apply`][layerfuse.ops.attention.dispatch.AttentionBackend.apply].
    ``not_supported_reasons`` returns an empty list when the backend can run the inputs, otherwise one
    line per problem, each naming what came in and what is supported, e.g.
    ``"dtype=float64 (supported: bfloat16, float16, float32)"``.
    """

    #: Largest head dim D (and Dv) it accepts; ``None`` means no limit.
    MAX_HEAD_DIM: ClassVar[int | None] = None
    SUPPORTS_MASK: ClassVar[bool] = True
    SUPPORTS_DROPOUT: ClassVar[bool] = True

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        reasons = self.device_dtype_reasons(inputs.device, (inputs.dtype,))
        head_dim = max(inputs.head_dim, inputs.value.shape[-1])
        if self.MAX_HEAD_DIM is not None and head_dim > self.MAX_HEAD_DIM:
            reasons.append(f"head_dim={head_dim} (supported: <= {self.MAX_HEAD_DIM})")
        if not self.SUPPORTS_MASK and inputs.mask is not None:
            reasons.append(f"mask={inputs.mask_kind} (supported: none)")
        if not self.SUPPORTS_DROPOUT and inputs.dropout_p > 0:
            reasons.append(f"dropout_p={inputs.dropout_p} (supported: 0.0)")
        return reasons

    @abstractmethod
    def apply(self, inputs: AttentionInputs) -> Tensor:
        """Attention on validated inputs whose mask has no fully masked query row.

        Returns (B, H, Nq, Dv) in ``inputs.dtype``. Fully masked rows are handled once, by the caller.
        """


REGISTRY: BackendRegistry[AttentionBackend] = BackendRegistry(_WHERE, AttentionBackend)

register_backend = REGISTRY.register
unregister_backend = REGISTRY.unregister
backend_names = REGISTRY.names
get_backend = REGISTRY.get
check_backend_name = REGISTRY.check_name
auto_order = REGISTRY.auto_order
select_backend = REGISTRY.select


def apply_backend(backend: AttentionBackend, inputs: AttentionInputs) -> Tensor:
    """Run ``backend`` on ``inputs``, with a query row holding NaN or ±Inf giving NaN on every backend.

    The eager formula turns such a row into NaN (its scores hold NaN, or ±Inf whose softmax is NaN).
    PyTorch's fused CPU SDPA kernel returns 0 for a NaN query row instead, so without this the result
    would depend on the backend ``"auto"`` picks. Keys and values need nothing: every backend already
    makes a NaN key or value reach the whole output.
    """
    out = backend.apply(inputs)
    finite = torch.isfinite(inputs.query).all(dim=-1, keepdim=True)
    return out.masked_fill(~finite, float("nan"))
