"""Lin et al.'s internal fusion checkpoints (I_D, I_M): ``mm_projector_f``, ``mm_projectors.{i}``,
``layers.{j}.ucross_*``."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

from .._checks import check_choice
from ..internal.direct import InternalDirect
from ..internal.layer_maps import lin_layer_map
from ..internal.modular import InternalModular
from ..serialization import load_strict
from .state_dict import llava_projector_shape, target_dtype

__all__ = ["convert_lin_internal"]

# Whole dotted tokens: "mm_projectors.1." never matches "mm_projectors.10." (the authors' substring
# filter mixes projectors 1 and 10-19).
_PROJECTOR = re.compile(r"(?:^|\.)mm_projectors\.(\d+)\.(.+)$")
_INPUT_PROJECTOR = re.compile(r"(?:^|\.)mm_projector_f\.(.+)$")
_UCROSS = re.compile(r"(?:^|\.)layers\.(\d+)\.ucross_(attn|mlp|xattn|xmlp)\.(.+)$")
_LLM_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|input_layernorm)\.")
_UCROSS_NAMES = {"attn": "attn.", "mlp": "mlp.", "xattn": "attn_gate.", "xmlp": "mlp_gate."}


def _map_keys(
    state_dict: Mapping[str, Tensor], fused_layers: tuple[int, ...], *, where: str
) -> tuple[dict[str, Tensor], dict[str, str], list[str]]:
    """The checkpoint's fusion keys renamed to the layerfuse module's, and the fusion keys that fit nowhere."""
    mapped: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    unexpected: list[str] = []
    for key, value in state_dict.items():
        if (match := _PROJECTOR.search(key)) is not None:
            name = f"projectors.{int(match.group(1))}.{match.group(2)}"
        elif (match := _INPUT_PROJECTOR.search(key)) is not None:
            name = f"input_projector.{match.group(1)}"
        elif (match := _UCROSS.search(key)) is not None:
            layer = int(match.group(1))
            if layer not in fused_layers:
                unexpected.append(key)
                continue
            name = f"blocks.{fused_layers.index(layer)}.{_UCROSS_NAMES[match.group(2)]}{match.group(3)}"
        else:
            continue  # the LLM and the vision tower are not the fusion's
        if name in mapped:
            raise ValueError(
                f"{where}: checkpoint keys {origin[name]!r} and {key!r} both map to {name}; pass a state_dict that "
                "holds one model"
            )
        mapped[name], origin[name] = value, key
    return mapped, origin, unexpected


def convert_lin_internal(
    state_dict: Mapping[str, Tensor],
    *,
    dtype: torch.dtype | None = None,
    paradigm: str | None = None,
    strategy: str = "3-18-23",
    num_layers: int | None = None,
    num_heads: int | None = None,
    mode: str = "authors",
) -> InternalDirect | InternalModular:
    """Load Lin et al.'s internal fusion (I_D or I_M) from the keys their trainer writes.

    Keys read (any prefix, matched on whole dotted tokens):

    ```text
    mm_projector_f.{0,2}.{weight,bias}           -> input_projector.*   (LLM input tokens, last ViT layer)
    mm_projectors.{i}.{0,2}.{weight,bias}        -> projectors.{i}.*    (level i)
    layers.{j}.ucross_attn.{q,k,v,o}_proj.weight -> blocks.{i}.attn.*   (I_M, j = i-th fused layer)
    layers.{j}.ucross_mlp.{gate,up,down}_proj.weight -> blocks.{i}.mlp.*
    layers.{j}.ucross_xattn.weight / ucross_xmlp.weight -> blocks.{i}.attn_gate / mlp_gate .weight
    ```

    ``mm_projectors.{i}.`` is matched on the whole index, unlike the authors' substring filter, which
    puts projectors 10-19 into ``mm_projector_1.bin`` (their stage 2 then crashes for ``former``,
    ``latter`` and ``all``). Loading is strict: every missing and unexpected fusion key is listed and
    nothing is loaded partially. LLM and vision-tower keys are ignored.

    Args:
        state_dict: the authors' full checkpoint or their stage-1 files merged (``mm_projector_f.bin``,
            ``mm_projector_{i}.bin``, ``ucross.bin``).
        dtype: build in this dtype. Default: the checkpoint's, bf16/fp16 upcast to float32.
        paradigm: ``"I_D"`` or ``"I_M"``. Default: ``"I_M"`` when ``ucross_*`` keys are present, else ``"I_D"``.
        strategy: ``--layer_using_strategy`` (``"18"``, ``"3-18"``, ``"3-18-23"``, ``"former"``,
            ``"latter"``, ``"all"``). Default: ``"3-18-23"``
        num_layers: the LLM's decoder-layer count N of the layer map. Default: read from the
            checkpoint's LLM keys (``layers.{j}.self_attn``); required when the checkpoint has none.
        num_heads: I_M only, the LLM's attention heads (the cross-attention uses them). Required for I_M.
        mode: I_M only, ``"authors"`` (the arithmetic these weights were trained with) or
            ``"corrected"`` (see [`InternalModular`][layerfuse.internal.InternalModular]). Default: ``"authors"``

    Returns:
        [`InternalDirect`][layerfuse.internal.InternalDirect] or
        [`InternalModular`][layerfuse.internal.InternalModular] with ``input_projector`` set.

    Raises:
        ValueError: unknown options, no ``mm_projector_f`` keys, N missing or too small for the
            strategy, missing/unexpected keys or shape mismatches (all listed).

    Examples:
        >>> fusion = from_official("lin_internal", "checkpoint.bin", strategy="3-18-23")  # doctest: +SKIP
        >>> fusion.attach(llm)  # doctest: +SKIP
    """
    where = "convert_lin_internal"
    has_ucross = any(_UCROSS.search(k) for k in state_dict)
    if paradigm is None:
        paradigm = "I_M" if has_ucross else "I_D"
    check_choice(where, "paradigm", paradigm, ("I_D", "I_M"))
    check_choice(where, "mode", mode, ("authors", "corrected"))
    if num_layers is None:
        found = [int(m.group(1)) for k in state_dict if (m := _LLM_LAYER.search(k)) is not None]
        if not found:
            raise ValueError(
                f"{where}: num_layers (the LLM's decoder-layer count) is needed for the layer map and the checkpoint "
                "holds no LLM layers to read it from; pass num_layers="
            )
        num_layers = max(found) + 1
    fused = lin_layer_map(strategy, num_layers)
    input_state = {k[len("input_projector."):]: v for k, v in _map_keys(state_dict, fused, where=where)[0].items()
                   if k.startswith("input_projector.")}
    if not input_state:
        sample = ", ".join(list(state_dict)[:5]) or "none"
        raise ValueError(f"{where}: no key contains 'mm_projector_f.'; got {len(state_dict)} keys, e.g. {sample}")
    kind, in_dim, hidden = llava_projector_shape(input_state, where=where, anchor="mm_projector_f")
    mapped, origin, unexpected = _map_keys(state_dict, fused, where=where)
    build_dtype = target_dtype(mapped, dtype, where=where)
    module: InternalDirect | InternalModular
    if paradigm == "I_D":
        module = InternalDirect(in_dim, hidden, fused, projector=kind, input_projector=kind, dtype=build_dtype)
    else:
        if num_heads is None:
            raise ValueError(f"{where}: paradigm='I_M' needs num_heads (the LLM's num_attention_heads)")
        q, k = mapped.get("blocks.0.attn.q_proj.weight"), mapped.get("blocks.0.attn.k_proj.weight")
        gate = mapped.get("blocks.0.mlp.gate_proj.weight")
        if q is None or k is None or gate is None:
            raise ValueError(
                f"{where}: paradigm='I_M' needs layers.{fused[0]}.ucross_attn.{{q,k}}_proj.weight and "
                f"layers.{fused[0]}.ucross_mlp.gate_proj.weight (the first fused layer of strategy {strategy!r} "
                f"on {num_layers} layers); found ucross keys: {has_ucross}"
            )
        head_dim = q.shape[0] // num_heads
        module = InternalModular(
            in_dim, hidden, fused, num_heads=num_heads, num_kv_heads=k.shape[0] // head_dim, head_dim=head_dim,
            intermediate_size=gate.shape[0], mode=mode, projector=kind, input_projector=kind, dtype=build_dtype,
        )
        if mode == "corrected":  # the authors' blocks have no norms; start them at the identity scale
            for i in range(len(fused)):
                for norm in ("attn_norm", "mlp_norm"):
                    mapped.setdefault(f"blocks.{i}.{norm}.weight", torch.ones(hidden, dtype=build_dtype))
    expected = set(module.state_dict())
    missing = sorted(expected - set(mapped))
    extra = sorted(unexpected + [origin[k] for k in mapped if k not in expected])
    if missing or extra:
        lines = [f"{where}: the checkpoint does not fit {paradigm} {strategy!r} on {num_layers} LLM layers "
                 f"(fused layers {list(fused)}); nothing was loaded."]
        if missing:
            lines.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if extra:
            lines.append(f"unexpected keys ({len(extra)}): {', '.join(extra)}")
        raise ValueError("\n".join(lines))
    load_strict(module, {k: v.to(build_dtype) for k, v in mapped.items()}, source=where)
    return module
