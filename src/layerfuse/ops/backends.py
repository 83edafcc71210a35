"""Kernel backends and the registry that picks one, shared by every dispatched op.

Modelled on xformers' fMHA dispatch: each backend declares the devices and dtypes it supports and
says in words why it cannot run a given call (``not_supported_reasons``); ``backend="auto"`` walks a
per-device priority list and takes the first backend with no reasons; a backend named explicitly is
held to the same reasons and raises instead of falling back.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import ClassVar, Generic, Protocol, TypeVar

import torch
from torch import Tensor

__all__ = ["FLOAT_DTYPES", "Backend", "BackendRegistry", "dtype_name"]

FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class OpInputs(Protocol):
    """What the registry needs of an op's packed arguments."""

    @property
    def device(self) -> torch.device: ...

    def describe(self) -> str: ...


InputsT = TypeVar("InputsT", bound=OpInputs)


class Backend(ABC, Generic[InputsT]):
    """One implementation of an op.

    Subclasses set ``name``, declare ``SUPPORTED_DEVICES`` (``None``: any device) and
    ``SUPPORTED_DTYPES``, and implement `not_supported_reasons` (usually
    `device_dtype_reasons` plus op-specific limits) and `apply`. Each reason names what came
    in and what is supported, e.g. ``"dtype=float64 (supported: bfloat16, float16)"``.
    """

    name: ClassVar[str]
    SUPPORTED_DEVICES: ClassVar[frozenset[str] | None] = None
    SUPPORTED_DTYPES: ClassVar[frozenset[torch.dtype]] = FLOAT_DTYPES

    def unavailable_reason(self) -> str | None:
        """Why the backend cannot run at all in this environment (e.g. a package is missing)."""
        return None

    def supports_device(self, device: torch.device) -> bool:
        return self.SUPPORTED_DEVICES is None or device.type in self.SUPPORTED_DEVICES

    def supported_devices_text(self) -> str:
        return "any" if self.SUPPORTED_DEVICES is None else ", ".join(sorted(self.SUPPORTED_DEVICES))

    def device_dtype_reasons(self, device: torch.device, dtypes: Iterable[torch.dtype]) -> list[str]:
        """The reasons every backend shares: not installed, wrong device, unsupported dtype(s)."""
        reasons = []
        missing = self.unavailable_reason()
        if missing is not None:
            reasons.append(missing)
        if not self.supports_device(device):
            reasons.append(f"device={device.type} (supported: {self.supported_devices_text()})")
        unsupported = sorted({dtype_name(d) for d in dtypes if d not in self.SUPPORTED_DTYPES})
        if unsupported:
            supported = ", ".join(sorted(dtype_name(d) for d in self.SUPPORTED_DTYPES))
            reasons.append(f"dtype={', '.join(unsupported)} (supported: {supported})")
        return reasons

    @abstractmethod
    def not_supported_reasons(self, inputs: InputsT) -> list[str]:
        """Empty when the backend can run ``inputs``; otherwise one line per problem."""

    @abstractmethod
    def apply(self, inputs: InputsT) -> Tensor:
        """Run the op on validated inputs."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


BackendT = TypeVar("BackendT", bound=Backend)


class BackendRegistry(Generic[BackendT]):
    """The backends of one op, by name, and the order ``backend="auto"`` tries them on each device.

    Args:
        op: the op's public name, used in error messages.
        kind: the backend base class of this op; registering anything else is a ``TypeError``.
    """

    def __init__(self, op: str, kind: type[BackendT]) -> None:
        self.op, self.kind = op, kind
        self._backends: dict[str, BackendT] = {}
        # Device type -> names "auto" tries first on that device; the fallback list follows everywhere.
        self._priority: dict[str, list[str]] = {}
        self._fallback: list[str] = []

    def register(self, backend: BackendT, *, auto_devices: tuple[str, ...] = (), fallback: bool = False) -> None:
        """Make ``backend`` selectable by name and, optionally, by ``backend="auto"``.

        Args:
            backend: a backend instance; ``backend.name`` is what ``backend=`` selects.
            auto_devices: device types (``"cuda"``, ``"cpu"``, ...) on which ``"auto"`` tries it before
                the backends registered earlier.
            fallback: ``"auto"`` tries it after the device's own list, on every device.
        """
        if not isinstance(backend, self.kind):
            raise TypeError(f"register_backend: backend expected a {self.kind.__name__}, got {type(backend).__name__}")
        if backend.name in ("auto", *self._backends):
            raise ValueError(f"register_backend: a backend named {backend.name!r} is already registered")
        self._backends[backend.name] = backend
        for device in auto_devices:
            self._priority.setdefault(device, []).insert(0, backend.name)
        if fallback:
            self._fallback.append(backend.name)

    def unregister(self, name: str) -> BackendT:
        """Remove a registered backend (from ``"auto"`` too) and return it."""
        backend = self.get(name)
        del self._backends[name]
        for names in (*self._priority.values(), self._fallback):
            while name in names:
                names.remove(name)
        return backend

    def names(self) -> tuple[str, ...]:
        """Names accepted by ``backend=`` besides ``"auto"``, in registration order."""
        return tuple(self._backends)

    def check_name(self, where: str, name: object) -> str:
        """``name`` if it is ``"auto"`` or registered, else a ``ValueError`` listing the choices."""
        if not isinstance(name, str) or (name != "auto" and name not in self._backends):
            allowed = ", ".join(repr(n) for n in ("auto", *self._backends))
            raise ValueError(f"{where}: backend expected one of {allowed}, got {name!r}")
        return name

    def get(self, name: str) -> BackendT:
        self.check_name(self.op, name)
        if name == "auto":
            raise ValueError(f"{self.op}: backend 'auto' is a selection rule, not a backend; use select()")
        return self._backends[name]

    def auto_order(self, device: torch.device) -> list[str]:
        """The backends ``"auto"`` tries on ``device``, in order."""
        return list(dict.fromkeys([*self._priority.get(device.type, []), *self._fallback]))

    def select(self, inputs: OpInputs, backend: str = "auto") -> BackendT:
        """The named backend (or a ``ValueError`` with its reasons), or for ``"auto"`` the first
        backend on the device's priority list that can run ``inputs``."""
        if backend != "auto":
            chosen = self.get(backend)
            reasons = chosen.not_supported_reasons(inputs)
            if reasons:
                raise ValueError(
                    f"{self.op}: backend={backend!r} cannot run these inputs: {'; '.join(reasons)}. "
                    f"Inputs: {inputs.describe()}"
                )
            return chosen
        why_not = []
        for name in self.auto_order(inputs.device):
            reasons = self._backends[name].not_supported_reasons(inputs)
            if not reasons:
                return self._backends[name]
            why_not.append(f"{name}: {'; '.join(reasons)}")
        raise ValueError(f"{self.op}: no backend can run these inputs ({inputs.describe()}): {' | '.join(why_not)}")
