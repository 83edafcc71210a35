"""Reading the authors' checkpoints: key prefixes, dtypes and files, shared by every converter."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..serialization import load_tensor_file

__all__ = ["llava_projector_shape", "load_checkpoint_file", "select_prefixed", "select_required", "target_dtype"]

_LINEAR_KEY = re.compile(r"^(\d+)\.(weight|bias)$")


def load_checkpoint_file(path: str | Path, *, where: str = "from_official") -> dict[str, Tensor]:
    """Read a ``.safetensors`` file or a ``torch.save``\\ d ``.bin``/``.pt`` dict (tensors only).

    ``where`` names the caller in error messages; a truncated or corrupt file is a ``ValueError``
    naming it (see `layerfuse.serialization.load_tensor_file`).
    """
    return load_tensor_file(path, where=where)


def select_prefixed(state_dict: Mapping[str, Tensor], anchor: str, *, where: str) -> dict[str, Tensor]:
    """Keys that contain the module name ``anchor`` as a whole dotted component, with everything up to
    and including the first ``anchor.`` stripped.

    ``anchor="mm_projector"`` keeps ``model.mm_projector.0.weight`` as ``0.weight`` and
    ``base_model.model.model.mm_projector.2.bias`` as ``2.bias``, but never ``mm_projector_f.*`` or
    ``mm_projectors.1.*``; ``anchor="mm_projectors.1"`` does not match ``mm_projectors.10``. (LLaVA's own
    loader splits on the bare substring and trips over exactly those siblings.) Keys without the anchor
    are left out; two keys that strip to the same name are an error, never a silent overwrite.
    """
    pattern = re.compile(rf"(?:^|\.){re.escape(anchor)}\.")
    selected: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in state_dict.items():
        match = pattern.search(key)
        if match is None:
            continue
        short = key[match.end():]
        if short in selected:
            raise ValueError(
                f"{where}: checkpoint keys {origin[short]!r} and {key!r} both map to {anchor}.{short}; "
                "pass a state_dict that holds one model"
            )
        if not isinstance(value, Tensor):
            raise TypeError(f"{where}: checkpoint entry {key!r} expected a tensor, got {type(value).__name__}")
        selected[short], origin[short] = value, key
    return selected


def select_required(state_dict: Mapping[str, Tensor], anchor: str, *, where: str) -> dict[str, Tensor]:
    """[`select_prefixed`][layerfuse.convert.select_prefixed], but a checkpoint with no key under ``anchor`` is an error that shows
    what the checkpoint does hold."""
    selected = select_prefixed(state_dict, anchor, where=where)
    if not selected:
        sample = ", ".join(list(state_dict)[:5]) or "none"
        raise ValueError(f"{where}: no key contains '{anchor}.'; got {len(state_dict)} keys, e.g. {sample}")
    return selected


def target_dtype(tensors: Mapping[str, Tensor], dtype: torch.dtype | None, *, where: str) -> torch.dtype:
    """The dtype a converted module is built in.

    An explicit ``dtype`` wins. Otherwise the checkpoint's precision is kept, except that bf16/fp16
    weights are upcast to float32 (the authors' trainers save bf16; training and inference of the fuser
    should start from float32 masters).
    """
    if dtype is not None:
        if not dtype.is_floating_point:
            raise TypeError(f"{where}: dtype expected a floating-point torch.dtype, got {dtype}")
        return dtype
    found = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if torch.float64 in found:
        return torch.float64
    return torch.float32


def llava_projector_shape(
    projector_state: Mapping[str, Tensor], *, where: str, anchor: str = "mm_projector", first: int = 0
) -> tuple[str, int, int]:
    """``(kind, in_dim, out_dim)`` of a LLaVA ``linear`` / ``mlp{N}x_gelu`` projector from its weights.

    ``projector_state`` has keys relative to the projector (``0.weight``, ``0.bias``, ``2.weight``, ...):
    Linears at the indices first, first + 2, ..., first + 2(N-1) (GELUs in between hold no weights).
    ``first=1`` reads MMFuser's layout, where the fuser sits at index 0 of the same ``Sequential``
    (pass the keys without the fuser's). Any other key, or a gap in the run, is an error naming ``anchor``.
    """
    linears: dict[int, dict[str, Tensor]] = {}
    unexpected = []
    for key, value in projector_state.items():
        match = _LINEAR_KEY.match(key)
        if match is None or int(match.group(1)) < first or (int(match.group(1)) - first) % 2:
            unexpected.append(f"{anchor}.{key}")
            continue
        linears.setdefault(int(match.group(1)), {})[match.group(2)] = value
    if unexpected:
        raise ValueError(
            f"{where}: unexpected keys ({len(unexpected)}): {', '.join(sorted(unexpected))}; a LLaVA projector "
            f"holds its Linears at {anchor}.{first}.*, {anchor}.{first + 2}.*, ..."
        )
    expected = list(range(first, first + 2 * len(linears), 2))
    if not linears or sorted(linears) != expected or any("weight" not in p for p in linears.values()):
        found = ", ".join(f"{anchor}.{i}.{name}" for i in sorted(linears) for name in sorted(linears[i])) or "none"
        raise ValueError(
            f"{where}: missing keys: a LLaVA projector needs {anchor}.{first}.weight, "
            f"{anchor}.{first + 2}.weight, ... without gaps; found {found}"
        )
    out_dim, in_dim = linears[first]["weight"].shape
    kind = "linear" if len(linears) == 1 else f"mlp{len(linears)}x_gelu"
    return kind, int(in_dim), int(out_dim)
