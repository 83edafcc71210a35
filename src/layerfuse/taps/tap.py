"""``LayerTap``: the hidden states of chosen layers of a vision transformer, by forward hooks."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from typing import Any

from einops import pack, unpack
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .._checks import check_choice
from ..features import TOKEN_MODES, LayerFeatures
from .backbones import Backbone, find_backbone

__all__ = ["LayerTap"]

# b batch, n tokens, c channels


class _StopForward(Exception):
    """Raised by the hook on the deepest requested block so the blocks after it never run."""


class _Recorder:
    """What the hooks share: whether a tap call is running and the states it kept.

    The hooks hold this object and nothing else, so the model never references the tap (no cycle
    keeps either alive) and a hook firing outside a tap call (the model used on its own, or
    activation checkpointing recomputing a block during backward) does nothing.
    """

    __slots__ = ("active", "states")

    def __init__(self) -> None:
        self.active = False
        self.states: dict[int, Tensor] = {}


def _keep_input(recorder: _Recorder, index: int, stop: bool, module: nn.Module, args: tuple, kwargs: dict) -> None:
    if recorder.active:
        recorder.states[index] = args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))
        if stop:
            raise _StopForward


def _keep_output(recorder: _Recorder, index: int, stop: bool, module: nn.Module, args: tuple, output: Any) -> None:
    if recorder.active:
        # transformers 4.x layers return a tuple (hidden_states, attentions?); 5.x and timm a tensor.
        recorder.states[index] = output[0] if isinstance(output, tuple | list) else output
        if stop:
            raise _StopForward


def _remove_all(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


class LayerTap(nn.Module):
    r"""Hidden states of chosen layers of a timm, Hugging Face or open_clip vision transformer.

    Index convention (the one LLaVA and the multi-layer fusion papers use, and Hugging Face's
    ``hidden_states``): **0 is the embedding output entering the first block** (after any pre-norm,
    e.g. CLIP's ``pre_layrnorm``, timm's ``norm_pre``, open_clip's ``ln_pre``), **k is the output of
    block k**, and negative indices count from the end (-1 = last block, -2 = LLaVA's default). So
    ``tap(images)[i]`` equals ``hidden_states[layers[i]]`` of a Hugging Face model and timm's
    ``forward_intermediates`` block ``layers[i] - 1``. No final norm is applied.

    Hooks are put on the blocks when the tap is built and do nothing outside a tap call; they are
    removed by [`remove`][layerfuse.taps.tap.LayerTap.remove], at the end of a ``with`` block, or when the tap is garbage collected.
    The tap registers ``model`` as its child, so ``tap.to(...)``, ``tap.eval()`` and
    ``torch.compile(tap)`` act on the model.

    Args:
        model: a timm ``VisionTransformer`` / ``Eva`` / DeiT, a transformers ``CLIPVisionModel``,
            ``CLIPVisionModelWithProjection``, ``SiglipVisionModel``, ``Dinov2Model``,
            ``Dinov2WithRegistersModel``, ``ViTModel`` (or a ``CLIPModel`` / ``SiglipModel``, tapped
            through its image tower), an open_clip ``VisionTransformer`` (or a CLIP model), or any
            model whose block list is named by ``blocks``.
        layers: hidden-state indices, in output order (repeats allowed), or ``"all"`` for
            ``0..depth``.
        tokens: ``"patch"`` drops every prefix token (CLS, registers, distillation), ``"cls_patch"``
            keeps the CLS token first (the model must have one), ``"all"`` keeps every token.
            Default: ``"patch"``
        stop_early: stop the forward after the deepest requested block, so later blocks, the final
            norm and the head never run. Default: ``True``
        blocks: dotted path of the block list (an ``nn.ModuleList`` / ``nn.Sequential``) inside
            ``model``; found by structure when ``None``.
        num_prefix_tokens: tokens in front of the patches; found from the model when ``None``.
            ``"cls_patch"`` needs a CLS token the tap can see (timm's ``cls_token``, a
            ``class_embedding`` or ``class_token`` parameter), which must come first.

    Shape:
        - images: (B, C_in, H_img, W_img)
        - output: a [`LayerFeatures`][layerfuse.LayerFeatures] list of ``len(layers)`` tensors (B, N, C) with
          N = H * W (``"patch"``), 1 + H * W (``"cls_patch"``) or num_prefix_tokens + H * W
          (``"all"``), where (H, W) is the patch grid (``output.grid``). ``output.stacked()`` gives
          (L, B, N, C) and ``output.maps()`` (``"patch"`` only) gives (B, C, H, W) maps.

    Examples:
        >>> import timm
        >>> vit = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
        >>> tap = LayerTap(vit, [3, -2])
        >>> features = tap(torch.randn(2, 3, 224, 224))
        >>> [tuple(f.shape) for f in features], features.grid
        ([(2, 196, 384), (2, 196, 384)], (14, 14))
    """

    layers: tuple[int, ...]
    resolved_layers: tuple[int, ...]
    tokens: str
    stop_early: bool
    grid: tuple[int, int] | None

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[int] | str,
        *,
        tokens: str = "patch",
        stop_early: bool = True,
        blocks: str | None = None,
        num_prefix_tokens: int | None = None,
    ) -> None:
        super().__init__()
        where = "LayerTap"
        backbone = find_backbone(model, blocks=blocks, num_prefix_tokens=num_prefix_tokens)
        check_choice(where, "tokens", tokens, TOKEN_MODES)
        if tokens == "cls_patch" and not backbone.has_class_token:
            raise ValueError(
                f"{where}: tokens='cls_patch' needs a CLS token, but {type(backbone.entry).__name__} has none; "
                "use tokens='patch' or tokens='all'"
            )
        if not isinstance(stop_early, bool):
            raise TypeError(f"{where}: stop_early expected a bool, got {type(stop_early).__name__}")
        self.model = model
        self.backbone: Backbone = backbone
        self.layers, self.resolved_layers = _resolve_layers(layers, backbone.depth)
        self.tokens = tokens
        self.stop_early = stop_early
        self.grid = None
        self._recorder = _Recorder()
        self._handles: list[RemovableHandle] = []
        self._install_hooks()
        # Removes the hooks if the tap is dropped without remove(); holds the handles, not the tap.
        self._finalizer = weakref.finalize(self, _remove_all, self._handles)

    @property
    def num_hidden_states(self) -> int:
        """Number of hidden states the model has: blocks + 1 (index 0 is the embedding output)."""
        return self.backbone.depth + 1

    @property
    def num_prefix_tokens(self) -> int:
        """Prefix tokens at the front of each output tensor (0, 1 for ``"cls_patch"``, all for ``"all"``)."""
        return {"patch": 0, "cls_patch": 1, "all": self.backbone.num_prefix_tokens}[self.tokens]

    @property
    def removed(self) -> bool:
        """Whether the hooks are gone ([`remove`][layerfuse.taps.tap.LayerTap.remove], the end of a ``with`` block)."""
        # The handle list, not the finalizer: torch.compile guards on what forward reads, and the
        # finalizer's global registry changes whenever any object is finalized.
        return not self._handles

    def _install_hooks(self) -> None:
        blocks, deepest = self.backbone.blocks, max(self.resolved_layers)
        for index in sorted(set(self.resolved_layers)):
            stop = self.stop_early and index == deepest
            if index == 0:
                hook = functools.partial(_keep_input, self._recorder, index, stop)
                handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
            else:
                hook = functools.partial(_keep_output, self._recorder, index, stop)
                handle = blocks[index - 1].register_forward_hook(hook)
            self._handles.append(handle)

    def remove(self) -> None:
        """Remove the hooks from the model; the tap cannot be called afterwards. Safe to call twice."""
        self._finalizer()

    def __enter__(self) -> LayerTap:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def forward(self, images: Tensor, **model_kwargs: Any) -> LayerFeatures:
        """Run the model on ``images`` and return the requested hidden states.

        Args:
            images: (B, C_in, H_img, W_img) pixel tensor, as the model expects it.
            **model_kwargs: passed unchanged to the model's forward (e.g. transformers'
                ``interpolate_pos_encoding=True`` for other image sizes).
        """
        where = "LayerTap.forward"
        if self.removed:
            raise RuntimeError(f"{where}: this tap's hooks were removed (remove() or a with block); build a new LayerTap")
        if not isinstance(images, Tensor):
            raise TypeError(f"{where}: images expected a torch.Tensor (B, C, H, W), got {type(images).__name__}")
        if images.ndim != 4:
            raise ValueError(f"{where}: images expected a 4-d tensor (B, C, H, W), got shape {tuple(images.shape)}")
        grid = self.backbone.grid_for((images.shape[-2], images.shape[-1]))
        recorder = self._recorder
        recorder.active = True
        try:
            self.backbone.entry(images, **model_kwargs)
        except _StopForward:
            pass
        finally:
            recorder.active = False
            states, recorder.states = recorder.states, {}
        missing = sorted(set(self.resolved_layers) - states.keys())
        if missing:
            raise RuntimeError(
                f"{where}: the forward of {type(self.backbone.entry).__name__} finished without running "
                f"the blocks that give hidden states {missing}"
            )
        self.grid = grid
        selected = [self._select(where, states[index], grid) for index in self.resolved_layers]
        return LayerFeatures(selected, grid=grid, layers=self.layers, num_prefix_tokens=self.num_prefix_tokens)

    def _select(self, where: str, state: Tensor, grid: tuple[int, int] | None) -> Tensor:
        if not self.backbone.batch_first:
            state = state.transpose(0, 1)
        prefix = self.backbone.num_prefix_tokens
        if state.ndim != 3 or state.shape[1] <= prefix:
            raise ValueError(
                f"{where}: block outputs of {type(self.backbone.entry).__name__} ({self.backbone.blocks_path}) "
                f"expected (B, N, C) with N > {prefix} prefix tokens, got {tuple(state.shape)}"
            )
        num_patches = state.shape[1] - prefix
        if grid is not None and grid[0] * grid[1] != num_patches:
            raise ValueError(
                f"{where}: expected {prefix} prefix tokens + {grid[0]}x{grid[1]} patches = "
                f"{prefix + grid[0] * grid[1]} tokens, got {state.shape[1]}; pass num_prefix_tokens= "
                "if the prefix count is wrong"
            )
        if self.tokens == "all" or (self.tokens == "cls_patch" and prefix == 1):
            return state
        if self.tokens == "patch":
            return state[:, prefix:]
        cls, _, patches = unpack(state, [[1], [prefix - 1], [num_patches]], "b * c")
        return pack([cls, patches], "b * c")[0]

    def extra_repr(self) -> str:
        return (
            f"layers={list(self.layers)}, tokens={self.tokens!r}, stop_early={self.stop_early}, "
            f"family={self.backbone.family!r}, blocks={self.backbone.blocks_path!r}, depth={self.backbone.depth}, "
            f"num_prefix_tokens={self.backbone.num_prefix_tokens}"
        )


def _resolve_layers(layers: Sequence[int] | str, depth: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(layers as given, absolute indices 0..depth) with every index checked against the depth."""
    where = "LayerTap"
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"{where}: layers expected a sequence of ints or 'all', got {layers!r}")
        every = tuple(range(depth + 1))
        return every, every
    if isinstance(layers, int) and not isinstance(layers, bool):
        raise TypeError(f"{where}: layers expected a sequence of ints (e.g. [{layers}]), got the int {layers}")
    if not isinstance(layers, Sequence) or len(layers) == 0:
        raise ValueError(f"{where}: layers expected a non-empty sequence of ints or 'all', got {layers!r}")
    for k in layers:
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"{where}: layers expected ints, got {type(k).__name__} {k!r} in {list(layers)}")
        if not -(depth + 1) <= k <= depth:
            raise ValueError(
                f"{where}: layer index {k} is out of range for a model with {depth} blocks "
                f"({depth + 1} hidden states): expected {-(depth + 1)} <= index <= {depth}"
            )
    return tuple(layers), tuple(k if k >= 0 else depth + 1 + k for k in layers)
