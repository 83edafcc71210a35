"""Attaching feature injection to the decoder layers of a Hugging Face decoder-only LLM.

The LLM is never edited: forward hooks are registered on its text model and on the chosen decoder
layers, the fusion parameters live in a separate module, and [`detach`][layerfuse.internal.InternalFusion.detach]
removes every hook, so the LLM's ``state_dict`` keys never change and its outputs return bit for bit.
This is the same contract as torchtune's ``FusionLayer`` (wrapped layer keeps its keys, fusion
parameters are a separate listed set), reached with hooks instead of a wrapper module so that
gradient checkpointing, PEFT and ``generate`` see the LLM's own layer classes.
"""

from __future__ import annotations

import weakref
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .._checks import check_index_list, check_module_inputs
from ..serialization import PretrainedMixin

__all__ = ["DECODER_LAYER_PATHS", "InternalFusion", "find_decoder_layers"]

# Where decoder-only LLMs keep their decoder layers, most specific first: multimodal wrappers
# (LLaVA, Qwen-VL, Gemma 3) hold the text model at ``model.language_model``; Llama, Mistral,
# Qwen2/3, Gemma/Gemma2 and Phi3 at ``model``; a bare text model holds ``layers`` itself.
DECODER_LAYER_PATHS = (
    "model.language_model.layers",
    "language_model.model.layers",
    "language_model.layers",
    "model.layers",
    "layers",
    "model.decoder.layers",
    "decoder.layers",
)


def find_decoder_layers(llm: nn.Module, *, where: str = "find_decoder_layers") -> tuple[nn.Module, nn.ModuleList]:
    """The text model that runs the decoder layers, and its ``nn.ModuleList`` of decoder layers.

    Duck-typed on attribute paths (`layerfuse.internal.DECODER_LAYER_PATHS`),
    so transformers is never imported; a PEFT model is unwrapped with ``get_base_model()``.

    Args:
        llm: an HF causal LM (``LlamaForCausalLM``, ...), its text model (``LlamaModel``), a
            multimodal wrapper (``Qwen3VLForConditionalGeneration``) or a PEFT model around one.
        where: the caller named in error messages.

    Returns:
        ``(text_model, layers)``.

    Raises:
        TypeError: ``llm`` is not an ``nn.Module``.
        ValueError: no non-empty ``nn.ModuleList`` at any of the known paths.

    Examples:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> llm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                                    num_attention_heads=4, vocab_size=64))
        >>> text_model, layers = find_decoder_layers(llm)
        >>> type(text_model).__name__, len(layers)
        ('LlamaModel', 2)
    """
    if not isinstance(llm, nn.Module):
        raise TypeError(f"{where}: llm expected an nn.Module (an HF decoder-only LLM), got {type(llm).__name__}")
    root = llm
    get_base = getattr(llm, "get_base_model", None)
    if callable(get_base):  # PEFT keeps the wrapped model's tree under base_model.model
        root = get_base()
    for path in DECODER_LAYER_PATHS:
        *parents, name = path.split(".")
        owner: Any = root
        for part in parents:
            owner = getattr(owner, part, None)
            if not isinstance(owner, nn.Module):
                break
        if not isinstance(owner, nn.Module):
            continue
        layers = getattr(owner, name, None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return owner, layers
    raise ValueError(
        f"{where}: could not find the decoder layers of {type(llm).__name__}: expected a non-empty nn.ModuleList at "
        f"one of {', '.join(DECODER_LAYER_PATHS)}; pass a decoder-only LLM (LlamaForCausalLM, Qwen2ForCausalLM, ...) "
        "or its text model"
    )


@dataclass
class _Inputs:
    """Validated features and where the image tokens sit (row-major order of the image-token mask)."""

    levels: list[Tensor]  # one (tokens, C) tensor per fused layer
    mask: Tensor  # (B, L) bool
    batch_index: Tensor  # (T,) sample of each image token
    token_index: Tensor  # (T,) sequence position of each image token
    slot_index: Tensor  # (T,) rank of the image token within its sample
    counts: list[int]  # image tokens per sample
    projected: dict[int, Tensor] = field(default_factory=dict)  # per level, reused by cached decoding steps


@dataclass
class _Call:
    """What the text model was called with; the decoder-layer hooks of that call read it."""

    inputs: _Inputs | None
    prefill: bool
    past_len: int
    attention_mask: Tensor | None


def _flatten_level(where: str, index: int, level: object) -> Tensor:
    if isinstance(level, Tensor):
        if level.ndim == 3:
            return level.reshape(-1, level.shape[-1])
        if level.ndim == 2:
            return level
        raise ValueError(
            f"{where}: features[{index}] expected shape (tokens, C) or (images, tokens, C), got {tuple(level.shape)}"
        )
    if isinstance(level, Sequence) and level and all(isinstance(t, Tensor) for t in level):
        return torch.cat([_flatten_level(where, index, t) for t in level], dim=0)
    raise TypeError(
        f"{where}: features[{index}] expected a tensor or a list of per-image tensors, got {type(level).__name__}"
    )


def _hidden_of(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _replace_output(output: Any, hidden: Tensor) -> Any:
    # transformers 4.x decoder layers return (hidden_states, ...); 5.x return the tensor
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


def _output_hidden(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def image_positions(levels: list[Tensor], image_token_mask: Tensor) -> _Inputs:
    """Where each row of the (already checked) flattened levels goes: sample, position, rank in sample."""
    counts = image_token_mask.sum(dim=1)
    batch_index, token_index = image_token_mask.nonzero(as_tuple=True)
    offsets = torch.cumsum(counts, 0) - counts
    slot_index = torch.arange(int(counts.sum()), device=image_token_mask.device) - offsets[batch_index]
    return _Inputs(levels, image_token_mask, batch_index, token_index, slot_index, counts.tolist())


def add_at_image_tokens(hidden: Tensor, inputs: _Inputs, values: Tensor) -> Tensor:
    """``hidden`` with ``values`` (T, H) added at the image-token positions; every other element is
    returned unchanged bit for bit (out of place, so a checkpointed input is never modified)."""
    index = (inputs.batch_index.to(hidden.device), inputs.token_index.to(hidden.device))
    return torch.index_put(hidden, index, values.to(device=hidden.device, dtype=hidden.dtype), accumulate=True)


class InternalFusion(PretrainedMixin, nn.Module):
    """Base class of the fusions that inject visual features inside an LLM's decoder layers.

    A subclass holds the fusion parameters (projectors, cross-attention blocks, patch mergers) and
    registers its hooks on the decoder layers listed in ``fused_layers`` (one per feature level).
    Typical use:

    ```text
    fusion = InternalDirect(...).attach(llm)          # hooks on; llm.state_dict() unchanged
    with fusion.inject(levels, image_token_mask):     # features of this batch
        out = llm(inputs_embeds=..., attention_mask=...)   # or llm.generate(...)
    fusion.detach()                                   # llm is exactly the original again
    ```

    The image-token mask is the (B, L) boolean mask of the positions that hold image tokens in the
    prefill sequence (``input_ids == image_token_id``), the one the multimodal model already builds.
    Feature level ``i`` feeds decoder layer ``fused_layers[i]``; each level is a tensor (T, C) in the
    row-major order of the mask's ``True`` entries, a tensor (images, tokens, C) (flattened to that
    order: images of sample 0 first), or a list of per-image tensors of different lengths. Samples
    without images, several images per sample, left and right padding all follow from the mask.

    Prefill detection: a call of the text model is the prefill when the cache (``cache`` /
    ``past_key_values``) is empty and the sequence is at least as long as the mask; I_D and DeepStack
    add features only then, so cached decoding steps never receive them. Gradient checkpointing:
    transformers 5 checkpoints ``forward`` under the module hooks, and every hook here is out of place,
    so a recompute never adds features twice.

    The fusion parameters are this module's parameters (``fusion.parameters()``); they are not
    registered inside the LLM, so PEFT ``target_modules="all-linear"`` never wraps them.

    Args:
        fused_layers: decoder-layer index of each feature level.
        where: the subclass name used in error messages.

    Raises:
        TypeError: ``fused_layers`` is not a non-empty sequence.
        ValueError: a negative or non-integer layer index.

    Examples:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from layerfuse.internal import InternalDirect
        >>> llm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                                    num_attention_heads=4, vocab_size=64))
        >>> keys = list(llm.state_dict())
        >>> fusion = InternalDirect(16, 32, [1]).attach(llm)
        >>> list(llm.state_dict()) == keys, fusion.attached
        (True, True)
        >>> fusion.detach()
    """

    fused_layers: tuple[int, ...]

    def __init__(self, fused_layers: Sequence[int], *, where: str) -> None:
        super().__init__()
        fused_layers = check_index_list(where, "fused_layers", fused_layers)
        if any(j < 0 for j in fused_layers):
            raise ValueError(f"{where}: fused_layers expected decoder-layer indices >= 0, got {list(fused_layers)}")
        self.fused_layers = tuple(fused_layers)
        self._handles: list[RemovableHandle] = []
        self._inputs: _Inputs | None = None
        self._call: _Call | None = None
        # a weak reference: assigning the LLM as an attribute would register it as a submodule
        self._attached_ref: weakref.ref[nn.Module] | None = None

    # -- subclass interface -------------------------------------------------------------------------
    @abstractmethod
    def _register(self, level: int, layer: nn.Module) -> list[RemovableHandle]:
        """Register the hooks of feature level ``level`` on its decoder layer."""

    def _expected_tokens(self, level: int, image_tokens: int) -> int:
        """Rows feature level ``level`` must have for ``image_tokens`` image tokens in the batch."""
        return image_tokens

    @abstractmethod
    def _project(self, level: int, features: Tensor) -> Tensor:
        """Level ``level``'s features (tokens, C) mapped to the LLM width: (image tokens, H)."""

    # -- embedding in a host model's config ------------------------------------------------------------
    def fusion_config(self) -> dict[str, Any]:
        """``{"class": name, "config": constructor kwargs}``, JSON-serialisable.

        What a host integration (an HF ``PretrainedConfig`` field) stores so that
        [`from_fusion_config`][layerfuse.internal.InternalFusion.from_fusion_config] rebuilds the module
        before its weights are loaded; the weights are this module's ``state_dict()`` under whatever
        attribute name the host registers it (``save_pretrained`` of the host then saves them).
        """
        return {"class": type(self).__name__, "config": self.get_config()}

    @staticmethod
    def from_fusion_config(
        saved: dict[str, Any], *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> InternalFusion:
        """Rebuild (fresh parameters) the fusion described by [`fusion_config`][layerfuse.internal.InternalFusion.fusion_config].

        Raises:
            ValueError: ``saved`` names no internal-fusion class.
        """
        name = saved.get("class") if isinstance(saved, dict) else None
        target = PretrainedMixin.registry.get(name) if isinstance(name, str) else None
        if target is None or not issubclass(target, InternalFusion) or target is InternalFusion:
            known = sorted(n for n, c in PretrainedMixin.registry.items()
                           if issubclass(c, InternalFusion) and c is not InternalFusion)
            raise ValueError(
                f"InternalFusion.from_fusion_config: saved expected {{'class': one of {known}, 'config': {{...}}}}, "
                f"got {saved!r}"
            )
        return target.from_config(saved["config"], device=device, dtype=dtype)

    # -- attaching ----------------------------------------------------------------------------------
    @property
    def _attached_to(self) -> nn.Module | None:
        return None if self._attached_ref is None else self._attached_ref()

    @property
    def attached(self) -> bool:
        """Whether hooks are registered on an LLM."""
        return self._attached_to is not None

    def attach(self, llm: nn.Module) -> InternalFusion:
        """Register the injection hooks on ``llm``'s text model and fused decoder layers.

        Args:
            llm: a decoder-only HF LLM (see [`find_decoder_layers`][layerfuse.internal.find_decoder_layers]).

        Returns:
            ``self``, for chaining.

        Raises:
            RuntimeError: already attached (call ``detach()`` first).
            ValueError: no decoder layers found, or a fused layer outside the LLM.
        """
        where = f"{type(self).__name__}.attach"
        if self._attached_to is not None:
            raise RuntimeError(f"{where}: already attached to a {type(self._attached_to).__name__}; detach() first")
        text_model, layers = find_decoder_layers(llm, where=where)
        outside = [j for j in self.fused_layers if j >= len(layers)]
        if outside:
            raise ValueError(
                f"{where}: fused_layers {list(self.fused_layers)} lie outside the LLM: it has {len(layers)} decoder "
                f"layers (0..{len(layers) - 1}), got layer(s) {outside}"
            )
        handles = [text_model.register_forward_pre_hook(self._text_model_pre_hook, with_kwargs=True)]
        try:
            for level, j in enumerate(self.fused_layers):
                handles += self._register(level, layers[j])
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        self._handles = handles
        self._attached_ref = weakref.ref(llm)
        return self

    def detach(self) -> None:
        """Remove every hook; the LLM computes exactly what it did before ``attach``."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._attached_ref = None
        self._call = None

    # -- features -----------------------------------------------------------------------------------
    def set_inputs(self, features: Sequence[Tensor | Sequence[Tensor]], image_token_mask: Tensor) -> None:
        """Hold ``features`` for the next LLM calls (until [`clear_inputs`][layerfuse.internal.InternalFusion.clear_inputs]).

        Args:
            features: one entry per fused layer (``len(fused_layers)``), each (T, C), (images, tokens, C)
                or a list of per-image (tokens, C) tensors; see the class docstring for the order.
            image_token_mask: (B, L) bool, ``True`` at the image tokens of the prefill sequence.

        Raises:
            TypeError: wrong types; a level that is not floating point, or whose dtype is not the
                fusion's (outside autocast).
            ValueError: wrong number of levels, a level on another device than the fusion or the mask,
                or a level whose row count does not match the number of image tokens in the mask.
        """
        where = f"{type(self).__name__}.set_inputs"
        if not isinstance(image_token_mask, Tensor) or image_token_mask.ndim != 2:
            got = tuple(image_token_mask.shape) if isinstance(image_token_mask, Tensor) else type(image_token_mask).__name__
            raise ValueError(f"{where}: image_token_mask expected a (batch, sequence) tensor, got {got}")
        if image_token_mask.dtype != torch.bool:
            raise TypeError(f"{where}: image_token_mask expected dtype torch.bool, got {image_token_mask.dtype}")
        if isinstance(features, Tensor) or not isinstance(features, Sequence):
            raise TypeError(
                f"{where}: features expected a list with one entry per fused layer, got {type(features).__name__}"
            )
        if len(features) != len(self.fused_layers):
            raise ValueError(
                f"{where}: features expected {len(self.fused_layers)} levels (one per fused layer "
                f"{list(self.fused_layers)}), got {len(features)}"
            )
        levels = [_flatten_level(where, i, level) for i, level in enumerate(features)]
        check_module_inputs(where, self, features=levels)
        for i, level in enumerate(levels):
            if level.device != image_token_mask.device:
                raise ValueError(
                    f"{where}: features[{i}] is on {level.device}, image_token_mask on {image_token_mask.device}; "
                    "expected one device"
                )
        counts = image_token_mask.sum(dim=1)
        total = int(counts.sum())
        for i, level in enumerate(levels):
            expected = self._expected_tokens(i, total)
            if level.shape[0] != expected:
                raise ValueError(
                    f"{where}: features[{i}] has {level.shape[0]} tokens, expected {expected} for the {total} image "
                    f"tokens of image_token_mask (per sample {counts.tolist()})"
                )
        self._inputs = image_positions(levels, image_token_mask)

    def clear_inputs(self) -> None:
        """Forget the held features; later LLM calls run without injection.

        The last LLM call keeps its own reference until the next call or ``detach()``, so a
        ``backward()`` after the ``inject`` block (gradient checkpointing recomputes inside it) sees the
        features that call used.
        """
        self._inputs = None

    @contextmanager
    def inject(self, features: Sequence[Tensor | Sequence[Tensor]], image_token_mask: Tensor) -> Iterator[None]:
        """Context in which the attached LLM receives ``features``; see
        [`set_inputs`][layerfuse.internal.InternalFusion.set_inputs] for the arguments.

        Examples:
            >>> with fusion.inject(levels, input_ids == image_token_id):  # doctest: +SKIP
            ...     logits = llm(inputs_embeds=embeds, attention_mask=attention_mask).logits
        """
        if self._attached_to is None:
            raise RuntimeError(f"{type(self).__name__}.inject: not attached; call attach(llm) first")
        self.set_inputs(features, image_token_mask)
        try:
            yield
        finally:
            self.clear_inputs()

    # -- hooks ---------------------------------------------------------------------------------------
    def _text_model_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        where = type(self).__name__
        inputs = self._inputs
        sequence = kwargs.get("inputs_embeds")
        if sequence is None:
            sequence = kwargs.get("input_ids")
        if sequence is None and args:
            sequence = args[0]
        cache = kwargs.get("cache")
        if cache is None:  # transformers before 5.x names it past_key_values
            cache = kwargs.get("past_key_values")
        past_len = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        attention_mask = kwargs.get("attention_mask")
        if not (isinstance(attention_mask, Tensor) and attention_mask.ndim == 2):
            attention_mask = None
        prefill = False
        if inputs is not None and isinstance(sequence, Tensor):
            batch, length = inputs.mask.shape
            if sequence.shape[0] != batch:
                raise ValueError(
                    f"{where}: the LLM was called with batch {sequence.shape[0]}, but the injected features and "
                    f"image_token_mask are for batch {batch}"
                )
            prefill = past_len == 0
            if prefill and sequence.shape[1] < length:
                raise ValueError(
                    f"{where}: image_token_mask covers {length} positions, but the LLM's prefill sequence has "
                    f"{sequence.shape[1]}; pass the mask of the sequence the LLM receives"
                )
        self._call = _Call(inputs, prefill, past_len, attention_mask)

    def _projected(self, level: int) -> Tensor:
        """Level ``level`` projected to the LLM width for the current call. A cached decoding step without
        gradients reuses the projection of its prefill (I_M reads the features at every step); every
        prefill projects afresh, so changed parameters are always seen."""
        call = self._call
        assert call is not None
        assert call.inputs is not None
        cached = call.inputs.projected
        reuse = not torch.is_grad_enabled() and call.past_len > 0
        if reuse and level in cached:
            return cached[level]
        value = self._project(level, call.inputs.levels[level])
        if not torch.is_grad_enabled():
            cached[level] = value
        else:
            cached.pop(level, None)
        return value

    def _active_call(self) -> _Call | None:
        call = self._call
        return call if call is not None and call.inputs is not None else None

    def _add_before(self, level: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        call = self._active_call()
        if call is None or not call.prefill:
            return None
        hidden = _hidden_of(args, kwargs)
        return _with_hidden(args, kwargs, add_at_image_tokens(hidden, call.inputs, self._projected(level)))

    def _add_after(self, level: int, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        call = self._active_call()
        if call is None or not call.prefill:
            return None
        hidden = _output_hidden(output)
        return _replace_output(output, add_at_image_tokens(hidden, call.inputs, self._projected(level)))

    def _pre_hook(self, level: int, layer: nn.Module) -> RemovableHandle:
        return layer.register_forward_pre_hook(partial(self._add_before, level), with_kwargs=True)

    def _post_hook(self, level: int, layer: nn.Module) -> RemovableHandle:
        return layer.register_forward_hook(partial(self._add_after, level), with_kwargs=True)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"{type(self).__name__} is not called directly: attach(llm) it, then run the LLM inside inject(...)"
        )
