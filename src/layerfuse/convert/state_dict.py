"""Reading the authors' checkpoints: key prefixes, dtypes and files, shared by every converter."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from .._optional import require

__all__ = ["load_checkpoint_file", "select_prefixed", "target_dtype"]


def load_checkpoint_file(path: str | Path) -> dict[str, Tensor]:
    """Read a ``.safetensors`` file or a ``torch.save``\\ d ``.bin``/``.pt`` dict (tensors only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"from_official: checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        st = require("safetensors.torch", extra="safetensors", purpose="reading .safetensors checkpoints")
        return dict(st.load_file(str(path)))
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, Mapping):
        raise TypeError(f"from_official: {path} holds a {type(loaded).__name__}, expected a dict of tensors")
    return dict(loaded)


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
