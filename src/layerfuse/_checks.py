"""Input validation shared by every public entry point.

Each helper raises ``TypeError`` for a wrong type and ``ValueError`` for a wrong value or shape, with a
message that names the function (``where``), the argument, what was expected and what came in. They
run at the API edge, outside any hot loop, and only read shapes, so ``torch.compile`` traces them as
constants.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "check_bool",
    "check_choice",
    "check_device",
    "check_feature_list",
    "check_float",
    "check_float_list",
    "check_grid",
    "check_index_list",
    "check_module_inputs",
    "check_positive_int",
    "check_same_batch",
    "check_same_tokens",
    "check_string",
    "check_tensor",
    "check_widths",
    "factory_kwargs",
    "resolve_grid",
    "resolve_level_grids",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_positive_int(where: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {name} expected a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{where}: {name} expected a positive int, got {value}")
    return value


def check_bool(where: str, name: str, value: object) -> bool:
    """``value`` is a bool (or a NumPy/PyTorch bool scalar); ``"no"`` or ``0`` is refused, not truth-tested."""
    if not isinstance(value, bool) and type(value).__name__ not in ("bool_", "bool"):
        raise TypeError(f"{where}: {name} expected a bool (True or False), got {type(value).__name__} {value!r}")
    return bool(value)


def check_string(where: str, name: str, value: object, expected: str = "a string") -> str:
    if not isinstance(value, str):
        raise TypeError(f"{where}: {name} expected {expected}, got {type(value).__name__} {value!r}")
    return value


def check_tensor(
    where: str, name: str, value: object, *, shape: str, ndim: int | None = None, last: int | None = None
) -> Tensor:
    """A floating-point tensor with ``ndim`` axes and a last axis of ``last``; ``shape`` spells the
    expected shape for the message, e.g. ``"(B, N, 256)"``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{where}: {name} expected a torch.Tensor {shape}, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{where}: {name} expected a floating-point tensor, got dtype {value.dtype}")
    if (ndim is not None and value.ndim != ndim) or (last is not None and (value.ndim == 0 or value.shape[-1] != last)):
        raise ValueError(f"{where}: {name} expected shape {shape}, got {tuple(value.shape)}")
    return value


def check_float(
    where: str,
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number (an int is accepted) within ``[low, high]``; ``low_open`` / ``high_open``
    exclude that end. Strings, bools, NaN and infinities are refused with the argument's name."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: {name} expected a real number (float), got {type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{where}: {name} expected a finite float, got {number}")
    below = low is not None and (number <= low if low_open else number < low)
    above = high is not None and (number >= high if high_open else number > high)
    if below or above:
        if low is not None and high is not None:
            span = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            span = f"{'>' if low_open else '>='} {low:g}"
        else:
            span = f"{'<' if high_open else '<='} {high:g}"
        raise ValueError(f"{where}: {name} expected a float {span}, got {number}")
    return number


def check_float_list(where: str, name: str, values: object, *, length: int | None = None) -> tuple[float, ...]:
    """A sequence of finite real numbers (``length`` of them when given)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, Tensor)):
        raise TypeError(f"{where}: {name} expected a sequence of floats, got {type(values).__name__} {values!r}")
    items = values.tolist() if isinstance(values, Tensor) else list(values)
    if length is not None and len(items) != length:
        raise ValueError(f"{where}: {name} expected {length} values, got {len(items)}: {items}")
    return tuple(check_float(where, f"{name}[{i}]", v) for i, v in enumerate(items))


def check_index_list(where: str, name: str, values: object, *, allow_empty: bool = False) -> tuple[int, ...]:
    """A sequence of int indices: ``1.5`` is refused rather than truncated, and ``"abc"`` is not a
    sequence of indices."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(
            f"{where}: {name} expected a sequence of int indices (e.g. [-2] or (3, 18, 23)), "
            f"got {type(values).__name__} {values!r}"
        )
    items = list(values)
    if not items and not allow_empty:
        raise ValueError(f"{where}: {name} expected at least one index, got an empty {type(values).__name__}")
    for i, v in enumerate(items):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{where}: {name}[{i}] expected an int index, got {type(v).__name__} {v!r} in {items}")
    return tuple(int(v) for v in items)


def check_device(where: str, name: str, value: object) -> torch.device:
    """A device string or ``torch.device`` that exists on this machine (``cuda`` with a GPU, an index
    below the device count)."""
    if not isinstance(value, (str, torch.device)):
        raise TypeError(f"{where}: {name} expected a torch device such as 'cpu' or 'cuda:0', got {value!r}")
    if isinstance(value, torch.device) and value.type in ("cpu", "meta"):
        return value
    try:
        device = torch.device(value)
    except RuntimeError:
        raise ValueError(
            f"{where}: {name} expected a torch device such as 'cpu', 'cuda' or 'cuda:1', got {value!r}"
        ) from None
    if device.type in ("cpu", "meta"):
        return device
    backend = getattr(torch, device.type, None)
    available = backend is not None and hasattr(backend, "is_available") and backend.is_available()
    if not available:
        raise ValueError(f"{where}: {name} {value!r}: no {device.type} device is available on this machine")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise ValueError(
            f"{where}: {name} {value!r}: this machine has {count} {device.type} device(s) (indices 0..{count - 1})"
        )
    return device


def factory_kwargs(where: str, device: object, dtype: object) -> dict[str, object]:
    """The ``device=`` / ``dtype=`` a module passes to its parameters, checked first: a floating-point
    ``torch.dtype`` and a device that exists (``None`` keeps PyTorch's defaults)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(
            f"{where}: dtype expected a floating-point torch.dtype (e.g. torch.float32, torch.bfloat16) or None, "
            f"got {dtype!r}"
        )
    if device is not None:
        device = check_device(where, "device", device)
    return {"device": device, "dtype": dtype}


def check_choice(where: str, name: str, value: object, choices: Sequence[object]) -> None:
    try:
        known = isinstance(value, str | int | float | type(None)) and value in choices
    except TypeError:  # unhashable or tensor-valued input compared against the choices
        known = False
    if not known:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{where}: {name} expected one of {allowed}, got {value!r}")


def check_feature_list(
    where: str,
    features: object,
    *,
    name: str = "features",
    length: int | None = None,
    min_length: int = 1,
    ndim: int = 3,
) -> list[Tensor]:
    """A sequence of floating-point tensors of rank ``ndim`` sharing batch size, device and dtype."""
    if isinstance(features, Tensor) or not isinstance(features, Sequence):
        raise TypeError(
            f"{where}: {name} expected a sequence (list or tuple) of tensors, got {type(features).__name__}"
        )
    feats = list(features)
    if length is not None and len(feats) != length:
        raise ValueError(f"{where}: {name} expected {length} tensors, got {len(feats)}")
    if len(feats) < min_length:
        raise ValueError(f"{where}: {name} expected at least {min_length} tensors, got {len(feats)}")
    for i, f in enumerate(feats):
        if not isinstance(f, Tensor):
            raise TypeError(f"{where}: {name}[{i}] expected a torch.Tensor, got {type(f).__name__}")
        if f.ndim != ndim:
            raise ValueError(
                f"{where}: {name}[{i}] expected a {ndim}-d tensor (B, N, C), got shape {tuple(f.shape)}"
            )
        if f.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{where}: {name}[{i}] expected a floating-point tensor, got dtype {f.dtype}")
    first = feats[0]
    for i, f in enumerate(feats[1:], start=1):
        if f.device != first.device:
            raise ValueError(
                f"{where}: {name}[{i}] is on {f.device} but {name}[0] is on {first.device}; "
                "all features must be on one device"
            )
        if f.dtype != first.dtype:
            raise TypeError(
                f"{where}: {name}[{i}] has dtype {f.dtype} but {name}[0] has {first.dtype}; "
                "all features must share one dtype"
            )
    check_same_batch(where, feats, name=name)
    return feats


def check_same_batch(where: str, tensors: Sequence[Tensor], *, name: str = "features") -> int:
    batch = tensors[0].shape[0]
    for i, t in enumerate(tensors):
        if t.shape[0] != batch:
            shapes = ", ".join(str(tuple(x.shape)) for x in tensors)
            raise ValueError(
                f"{where}: {name}[{i}] has batch size {t.shape[0]} but {name}[0] has {batch}; got shapes {shapes}"
            )
    return batch


def check_same_tokens(where: str, tensors: Sequence[Tensor], *, name: str = "features") -> int:
    """Every (B, N, C) tensor has the token count N of the first; returns N."""
    tokens = tensors[0].shape[1]
    for i, t in enumerate(tensors):
        if t.shape[1] != tokens:
            shapes = [tuple(x.shape) for x in tensors]
            raise ValueError(
                f"{where}: {name}[{i}] has {t.shape[1]} tokens but {name}[0] has {tokens}; got shapes {shapes}"
            )
    return tokens


def check_widths(where: str, features: Sequence[Tensor], widths: Sequence[int], *, name: str = "features") -> None:
    """Channel width of each feature equals the width the module was built for."""
    for i, (f, c) in enumerate(zip(features, widths, strict=True)):
        if f.shape[-1] != c:
            raise ValueError(
                f"{where}: {name}[{i}] expected shape (B, N, {c}), got {tuple(f.shape)}"
            )


def check_grid(where: str, grid: object, *, name: str = "grid") -> tuple[int, int]:
    if (
        not isinstance(grid, Sequence)
        or len(grid) != 2
        or not all(isinstance(g, int) and not isinstance(g, bool) for g in grid)
    ):
        raise TypeError(f"{where}: {name} expected a pair of ints (H, W), got {grid!r}")
    h, w = grid
    if h <= 0 or w <= 0:
        raise ValueError(f"{where}: {name} expected positive sides (H, W), got {(h, w)}")
    return int(h), int(w)


def resolve_grid(
    where: str,
    num_tokens: int,
    grid: Sequence[int] | None,
    features: object = None,
    default: Sequence[int] | None = None,
    *,
    name: str = "features",
) -> tuple[int, int]:
    """The (H, W) patch grid of ``num_tokens`` tokens.

    Taken, in order, from the explicit ``grid`` argument, from ``features.grid`` (what
    [`layerfuse.LayerTap`][layerfuse.LayerTap] attaches to its output), or from the module's ``default``. The token
    count is never square-rooted to guess a grid: a mismatch is an error.
    """
    source = "grid"
    if grid is None:
        grid, source = getattr(features, "grid", None), f"{name}.grid (from the tap)"
    if grid is None:
        grid, source = default, "the grid the module was built with"
    if grid is None:
        side = math.isqrt(num_tokens)
        hint = f" (e.g. grid=({side}, {side}))" if side * side == num_tokens else ""
        raise ValueError(
            f"{where}: cannot tell the patch grid of {num_tokens} tokens; pass grid=(H, W){hint}, "
            "feed the output of LayerTap, or build the module with a default grid"
        )
    h, w = check_grid(where, grid)
    if h * w != num_tokens:
        raise ValueError(
            f"{where}: {source} is {(h, w)} = {h * w} tokens but the input has {num_tokens} tokens; "
            "drop prefix (CLS/register) tokens first (tokens='patch') or pass the right grid"
        )
    return h, w


def _first_parameter(module: nn.Module) -> Tensor | None:
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor
    return None


def check_module_inputs(
    where: str,
    module: nn.Module,
    /,
    *,
    any_dtype: Collection[str] = (),
    lists: Collection[str] = ("features",),
    **inputs: object,
) -> None:
    """The tensor inputs of ``module``'s forward sit on the module's device and carry its dtype.

    ``inputs`` maps argument names to a tensor or a sequence of tensors (other values are left to the
    argument's own check). The module's device and dtype are those of its first floating-point
    parameter; a module without parameters takes any. The dtype must match unless autocast is on for
    the input's device (autocast picks each op's dtype) or the argument is listed in ``any_dtype``
    (the module casts it). Arguments named in ``lists`` take a sequence of tensors; a bare tensor
    there is left to the argument's own check. Each mismatch raises before any arithmetic, naming the argument, the
    module's device/dtype and the input's, instead of PyTorch's "mat1 and mat2 must have the same
    dtype" or "Tensor on device meta is not on the expected device".

    Raises:
        TypeError: an input of an integer or bool dtype, or of another float dtype than the module.
        ValueError: an input on another device than the module.
    """
    reference = _first_parameter(module)
    for name, value in inputs.items():
        if isinstance(value, Tensor) and name in lists:
            continue
        tensors = [(name, value)] if isinstance(value, Tensor) else (
            [(f"{name}[{i}]", t) for i, t in enumerate(value) if isinstance(t, Tensor)]
            if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) else []
        )
        for label, t in tensors:
            if not t.is_floating_point():
                raise TypeError(f"{where}: {label} expected a floating-point tensor, got dtype {t.dtype}")
            if reference is None:
                continue
            if t.device != reference.device:
                raise ValueError(
                    f"{where}: {label} is on {t.device} but the module's parameters are on "
                    f"{reference.device}; move the input (.to({str(reference.device)!r})) or the module"
                )
            if t.dtype != reference.dtype and name not in any_dtype and not torch.is_autocast_enabled(t.device.type):
                raise TypeError(
                    f"{where}: {label} has dtype {t.dtype} but the module's parameters are {reference.dtype}; "
                    f"cast the input (.to({reference.dtype})) or the module (.to({t.dtype})), "
                    "or run under torch.autocast"
                )


def resolve_level_grids(
    where: str,
    levels: Sequence[tuple[int, Tensor]],
    grid: Sequence[int] | None,
    level_grids: object,
    features: object = None,
    default: Sequence[int] | None = None,
) -> list[tuple[int, int]]:
    """The (H, W) grid of each key/value level of an attention fuser.

    ``levels`` pairs each level's position in ``features`` with its tensor (B, N, C). Without
    ``level_grids`` every level takes the query's grid as `resolve_grid` finds it; otherwise
    ``level_grids`` holds one (H, W) per level, in order, each matching that level's token count.
    """
    if level_grids is None:
        return [resolve_grid(f"{where}: features[{i}]", f.shape[1], grid, features, default) for i, f in levels]
    if isinstance(level_grids, Tensor | str | bytes) or not isinstance(level_grids, Sequence):
        raise TypeError(
            f"{where}: level_grids expected a sequence of {len(levels)} (H, W) pairs, "
            f"got {type(level_grids).__name__}"
        )
    if len(level_grids) != len(levels):
        raise ValueError(
            f"{where}: level_grids expected {len(levels)} (H, W) pairs, one per key/value level, "
            f"got {len(level_grids)}: {list(level_grids)}"
        )
    grids = []
    for (i, f), hw in zip(levels, level_grids):
        h, w = check_grid(where, hw, name=f"level_grids entry for features[{i}]")
        if h * w != f.shape[1]:
            raise ValueError(
                f"{where}: level grid {(h, w)} = {h * w} tokens does not fit features[{i}] with "
                f"{f.shape[1]} tokens (shape {tuple(f.shape)}); drop prefix (CLS/register) tokens first"
            )
        grids.append((h, w))
    return grids
