"""Input validation shared by every public entry point.

Each helper raises ``TypeError`` for a wrong type and ``ValueError`` for a wrong value or shape, with a
message that names the function (``where``), the argument, what was expected and what came in. They
run at the API edge, outside any hot loop, and only read shapes, so ``torch.compile`` traces them as
constants.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "check_choice",
    "check_feature_list",
    "check_grid",
    "check_module_dtype",
    "check_positive_int",
    "check_same_batch",
    "check_same_tokens",
    "check_widths",
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


def check_choice(where: str, name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
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


def check_module_dtype(where: str, tensor: Tensor, dtype: torch.dtype, *, name: str = "features") -> None:
    """``tensor`` has the module's parameter ``dtype``, unless autocast is on for its device (autocast
    then picks the dtype of each op, and mixing is what it is for)."""
    if tensor.dtype != dtype and not torch.is_autocast_enabled(tensor.device.type):
        raise TypeError(
            f"{where}: {name} have dtype {tensor.dtype} but the module's parameters are {dtype}; "
            f"cast the inputs (or the module with .to({tensor.dtype})), or run under torch.autocast"
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
    if isinstance(level_grids, Tensor) or not isinstance(level_grids, Sequence):
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
