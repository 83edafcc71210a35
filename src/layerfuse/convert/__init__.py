"""Load the authors' released projector checkpoints into layerfuse modules, and export to HF LLaVA.

``from_official(method, state_dict_or_path, *, dtype=None, **options)`` returns a
[`FusionProjector`][layerfuse.fusers.pipeline.FusionProjector] whose output equals the authors' whole
``mm_projector`` output; each method's options are documented on its converter function.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import factory_kwargs
from ..fusers.pipeline import FusionProjector
from .state_dict import load_checkpoint_file, select_prefixed, target_dtype

__all__ = ["CONVERTERS", "from_official", "load_checkpoint_file", "select_prefixed", "target_dtype"]

# method name -> "module:function"; imported on first use so a converter's dependencies stay lazy.
CONVERTERS: dict[str, str] = {
    "dense_connector": "layerfuse.convert.dense_connector:convert_dense_connector",
    "lin_ed": "layerfuse.convert.lin_ed:convert_lin_ed",
    "lin_em": "layerfuse.convert.lin_em:convert_lin_em",
    "mmfuser": "layerfuse.convert.mmfuser:convert_mmfuser",
    "igva": "layerfuse.convert.igva:convert_igva",
    "lin_internal": "layerfuse.convert.lin_internal:convert_lin_internal",
}


def _converter(method: str) -> Callable[..., FusionProjector | nn.Module]:
    if not isinstance(method, str) or method not in CONVERTERS:
        raise ValueError(
            f"from_official: method expected one of {', '.join(repr(m) for m in CONVERTERS)}, got {method!r}"
        )
    module_name, func_name = CONVERTERS[method].split(":")
    return getattr(importlib.import_module(module_name), func_name)


def from_official(
    method: str,
    state_dict: Mapping[str, Tensor] | str | Path,
    *,
    dtype: torch.dtype | None = None,
    **options: Any,
) -> FusionProjector | nn.Module:
    """Build the layerfuse module equivalent to an authors' checkpoint and load its weights.

    Args:
        method: ``"dense_connector"``, ``"lin_ed"``, ``"lin_em"``, ``"mmfuser"``, ``"igva"`` or
            ``"lin_internal"`` (Lin et al.'s I_D / I_M, which returns an internal fusion module).
        state_dict: a state dict with any key prefix (``model.mm_projector.``,
            ``base_model.model.model.mm_projector.``, ...) or the path of a ``.bin``/``.safetensors``
            file (``mm_projector.bin``, ``non_lora_trainables.bin``, ...).
        dtype: build the module in this dtype. Default: the checkpoint's, bf16/fp16 upcast to float32.
        **options: the method's settings (``variant=``, ``strategy=``, ``tower=``, ``heads=``, ...),
            documented on ``layerfuse.convert.<method>.convert_<method>``.

    Returns:
        A [`FusionProjector`][layerfuse.fusers.pipeline.FusionProjector] exposing ``layers`` and ``tokens``;
        for ``"lin_internal"`` an [`InternalDirect`][layerfuse.internal.InternalDirect] /
        [`InternalModular`][layerfuse.internal.InternalModular] to attach to the LLM.

    Raises:
        ValueError: unknown method or options, or keys that do not fit (all missing and unexpected keys
            are listed; nothing is loaded partially).
    """
    convert = _converter(method)
    factory_kwargs("from_official", None, dtype)
    accepted = [name for name in inspect.signature(convert).parameters if name not in ("state_dict", "dtype")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"from_official: {method!r} takes the options {', '.join(accepted) or 'none'}; "
            f"got unknown {', '.join(unknown)}"
        )
    if isinstance(state_dict, (str, Path)):
        state_dict = load_checkpoint_file(state_dict)
    elif not isinstance(state_dict, Mapping):
        raise TypeError(
            f"from_official: state_dict expected a mapping of tensors or a file path, got {type(state_dict).__name__}"
        )
    return convert(state_dict, dtype=dtype, **options)


def __getattr__(name: str) -> Any:
    # to_hf_llava pulls in its own helpers only when used
    if name == "to_hf_llava":
        return importlib.import_module("layerfuse.convert.hf_llava").to_hf_llava
    raise AttributeError(f"module 'layerfuse.convert' has no attribute {name!r}")
