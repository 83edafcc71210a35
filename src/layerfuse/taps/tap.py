"""``LayerTap``: the hidden states of chosen layers of a vision transformer, by forward hooks."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from typing import Any

import torch
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


def _strip_hooks(model: nn.Module, recorder: _Recorder) -> None:
    """Remove from ``model`` the hooks that write into ``recorder`` (copied along with a tap's model)."""
    for module in model.modules():
        for hooks, extras in (
            (module._forward_hooks, (module._forward_hooks_with_kwargs, module._forward_hooks_always_called)),
            (module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
        ):
            for key, hook in list(hooks.items()):
                if isinstance(hook, functools.partial) and hook.args and hook.args[0] is recorder:
                    del hooks[key]
                    for extra in extras:
                        extra.pop(key, None)


def _rebuild(model: nn.Module, recorder: _Recorder, layers: Sequence[int] | str, options: dict[str, Any]) -> LayerTap:
    """Unpickle / deep-copy target: a new tap on the copied model, without the copied (dead) hooks."""
    _strip_hooks(model, recorder)
    return LayerTap(model, layers, **options)


class LayerTap(nn.Module):
    r"""Hidden states of chosen layers of a timm, Hugging Face or open_clip vision transformer.

    Index convention (the one LLaVA and the multi-layer fusion papers use, and Hugging Face's
    ``hidden_states``): **0 is the embedding output entering the first block** (after any pre-norm,
    e.g. CLIP's ``pre_layrnorm``, timm's ``norm_pre``, open_clip's ``ln_pre``), **k is the output of
    block k**, and negative indices count from the end (-1 = last block, -2 = LLaVA's default). So
    ``tap(images)[i]`` equals ``hidden_states[layers[i]]`` of a Hugging Face model and timm's
    ``forward_intermediates`` block ``layers[i] - 1``. No final norm is applied.

    Hooks are put on the blocks when the tap is built and do nothing outside a tap call; they are
    removed by ``remove()``, at the end of a ``with`` block, or when the tap is garbage collected.
    The tap registers ``model`` as its child, so ``tap.to(...)``, ``tap.eval()`` and
    ``torch.compile(tap)`` act on the model. ``copy.deepcopy(tap)`` and pickling (``torch.save``)
    give a working tap on a copy of the model, with hooks of its own. A model wrapped by
    ``torch.compile`` (or compiled in place with ``model.compile()``) is run uncompiled by the tap,
    since its graph was traced without the hooks: compile the tap instead.

    The tap refuses to guess: every layout it returns is verified (the token count against the patch
    grid and the prefix tokens, the block output form), and architectures whose layout it cannot
    verify (XCiT, CrossViT, Hiera, Swin, PVT/Twins, TNT, PiT, CaiT, ConViT, DaViT, ViTMAE, ...) raise an error naming the architecture and what can be passed instead.

    Packed, variable-resolution towers (transformers Qwen2-VL, Qwen2.5-VL, Qwen3-VL and GLM-4V vision
    towers, Pixtral, SigLIP2 NaFlex, Gemma 4 vision) take their own inputs (flattened patches and
    ``grid_thw``; padded images and ``image_sizes``; patches, ``pixel_attention_mask`` and
    ``spatial_shapes``; patches and ``pixel_position_ids``) and
    give packed [`LayerFeatures`][layerfuse.LayerFeatures]: (N_1 + ... + N_n, C) per layer, every
    image's tokens in raster order (Qwen's 2x2 merge-window order and Qwen2.5-VL's attention-window
    order undone), with the per-image grids in ``features.grids``.

    Args:
        model: a timm ViT (``VisionTransformer``, ``Eva``, ``Beit``, SAM, Qwen3 / DeepSeek / Gemma4
            ViTs), a transformers vision tower (CLIP, SigLIP, DINOv2, DINOv3, ViT, DeiT, Aimv2, Llama 4,
            ``TimmWrapperModel``, ...), a packed variable-resolution tower (Qwen2-VL, Qwen2.5-VL,
            Qwen3-VL, GLM-4V, Pixtral, SigLIP2, Gemma 4), a whole multimodal model (tapped through
            its ``vision_model`` / ``vision_tower`` / ``visual``), an open_clip ``VisionTransformer``
            or whole ``CLIP``, or any model whose block list is named by ``blocks``. The docs'
            taps page lists what is supported and what is refused.
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
        - images: (B, C_in, H_img, W_img); packed towers: their own pixel input (see above)
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
        self._options = {"tokens": tokens, "stop_early": stop_early, "blocks": blocks,
                         "num_prefix_tokens": num_prefix_tokens}
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
        """Whether the hooks are gone (`remove()`, the end of a ``with`` block)."""
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

    def __reduce_ex__(self, protocol: Any) -> tuple:
        # A tap's hooks live on the model; a copy of the model carries copies of them that write into a
        # copy of the recorder. The copy of the tap removes those and installs hooks of its own.
        if self.removed:
            raise RuntimeError("LayerTap: cannot copy or pickle a tap whose hooks were removed; build a new LayerTap")
        return _rebuild, (self.model, self._recorder, self.layers, self._options)

    def remove(self) -> None:
        """Remove the hooks from the model; the tap cannot be called afterwards. Safe to call twice."""
        self._finalizer()

    def __enter__(self) -> LayerTap:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def forward(self, images: Tensor | None = None, **model_kwargs: Any) -> LayerFeatures:
        """Run the model on ``images`` and return the requested hidden states.

        Args:
            images: (B, C_in, H_img, W_img) pixel tensor, as the model expects it (positionally, or
                as ``pixel_values=`` in the Hugging Face calling style). Packed towers take their own
                pixel input: Qwen-VL / GLM-4V (N_patches, C_in * T * P * P) flattened patches, SigLIP2
                NaFlex (B, max N, C_in * P * P) patches, Pixtral (B, C_in, H_max, W_max) padded images.
            **model_kwargs: passed unchanged to the model's forward (e.g. transformers'
                ``interpolate_pos_encoding=True`` for other image sizes). Packed towers need their
                per-image grids: ``grid_thw`` (or the processor's ``image_grid_thw``) for Qwen-VL /
                GLM-4V, ``image_sizes`` for Pixtral, ``spatial_shapes`` and
                ``pixel_attention_mask`` for SigLIP2, ``pixel_position_ids`` for Gemma 4.

        Returns:
            [`LayerFeatures`][layerfuse.LayerFeatures]: one tensor per requested layer; packed
            (``features.grids`` set) for a packed tower.

        Raises:
            TypeError: no image tensor, or both ``images`` and ``pixel_values``.
            ValueError: the images or per-image grids do not have the expected form, or the tokens the
                blocks return do not match the verified layout (count against the grid and the
                prefix tokens, (B, N, C) form).
            RuntimeError: the tap was removed, or the model's forward did not run the tapped blocks.
        """
        where = "LayerTap.forward"
        if self.removed:
            raise RuntimeError(f"{where}: this tap's hooks were removed (remove() or a with block); build a new LayerTap")
        pixel_values = model_kwargs.pop("pixel_values", None)
        if images is not None and pixel_values is not None:
            raise TypeError(f"{where}: expected the images once, positionally or as pixel_values=, got both")
        images = images if images is not None else pixel_values
        if not isinstance(images, Tensor):
            raise TypeError(
                f"{where}: images expected a torch.Tensor (B, C, H, W) (positionally or as pixel_values=), "
                f"got {type(images).__name__}"
            )
        backbone = self.backbone
        grid, packing = None, None
        if backbone.packed:
            packing = _packing(where, backbone, images, model_kwargs)
        else:
            if images.ndim != 4:
                raise ValueError(f"{where}: images expected a 4-d tensor (B, C, H, W), got shape {tuple(images.shape)}")
            grid = backbone.grid_for((images.shape[-2], images.shape[-1]))
            if grid is None and self.tokens != "all":
                raise ValueError(
                    f"{where}: cannot verify the token layout of {type(backbone.entry).__name__}: its patch grid is "
                    f"unknown (no patch embedding whose grid the tap can compute), so tokens={self.tokens!r} would "
                    "have to guess which tokens are patches; pass tokens='all' to get every token as the blocks "
                    "return it"
                )
        entry = backbone.entry
        # A model compiled in place was traced without the tap's hooks; run its eager forward.
        call = entry._call_impl if getattr(entry, "_compiled_call_impl", None) is not None else entry
        recorder = self._recorder
        recorder.active = True
        try:
            call(images, **model_kwargs)
        except _StopForward:
            pass
        finally:
            recorder.active = False
            states, recorder.states = recorder.states, {}
        missing = sorted(set(self.resolved_layers) - states.keys())
        if missing:
            raise RuntimeError(
                f"{where}: the forward of {type(entry).__name__} finished without running the blocks that give "
                f"hidden states {missing} (a submodule compiled on its own runs a graph traced without the "
                "tap's hooks: build the tap before compiling, and compile the tap)"
            )
        if packing is not None:
            grids, index, form = packing
            selected = [_unpack(where, backbone, states[k], index, form) for k in self.resolved_layers]
            return LayerFeatures(selected, layers=self.layers, grids=grids)
        self.grid = grid
        selected = [self._select(where, states[index], grid) for index in self.resolved_layers]
        return LayerFeatures(selected, grid=grid, layers=self.layers, num_prefix_tokens=self.num_prefix_tokens)

    def _select(self, where: str, state: Any, grid: tuple[int, int] | None) -> Tensor:
        backbone = self.backbone
        name = f"{type(backbone.entry).__name__} ({backbone.blocks_path})"
        if isinstance(state, tuple | list):
            # transformers 4.x layers return (hidden_states, attentions?); any other tuple is a layout the
            # tap cannot verify (CrossViT's two branches, TNT's two streams).
            if backbone.family != "transformers" or not state or not isinstance(state[0], Tensor):
                raise ValueError(
                    f"{where}: the blocks of {name} return a {type(state).__name__} of {len(state)} items, not one "
                    "(B, N, C) tensor; the tap cannot tell which holds the tokens and refuses to guess"
                )
            state = state[0]
        if not isinstance(state, Tensor):
            raise ValueError(f"{where}: the blocks of {name} return {type(state).__name__}, expected a (B, N, C) tensor")
        if not backbone.batch_first:
            state = state.transpose(0, 1)
        if state.ndim == 4 and grid is not None and tuple(state.shape[1:3]) == grid:
            state = state.flatten(1, 2)  # (B, H, W, C) blocks on the patch grid (SAM ViT): raster order
        prefix, suffix = backbone.num_prefix_tokens, backbone.num_suffix_tokens
        if suffix:  # CLS appended last (Llama 4): verified against the grid like a prefix, then moved
            return self._select_cls_last(where, name, state, grid, suffix)
        if state.ndim != 3 or state.shape[1] <= prefix:
            raise ValueError(
                f"{where}: block outputs of {name} expected (B, N, C) with N > {prefix} prefix tokens"
                f"{'' if grid is None else f' (or (B, {grid[0]}, {grid[1]}, C))'}, got {tuple(state.shape)}; "
                "not a plain ViT layout the tap can verify"
            )
        num_patches = state.shape[1] - prefix
        if grid is not None and grid[0] * grid[1] != num_patches:
            raise ValueError(
                f"{where}: {name} expected {prefix} prefix tokens + {grid[0]}x{grid[1]} patches = "
                f"{prefix + grid[0] * grid[1]} tokens, got {state.shape[1]}; pass num_prefix_tokens= "
                "if the prefix count is wrong (the tap does not guess which tokens are patches)"
            )
        if self.tokens == "all" or (self.tokens == "cls_patch" and prefix == 1):
            return state
        if self.tokens == "patch":
            return state[:, prefix:]
        cls, _, patches = unpack(state, [[1], [prefix - 1], [num_patches]], "b * c")
        return pack([cls, patches], "b * c")[0]

    def _select_cls_last(
        self, where: str, name: str, state: Tensor, grid: tuple[int, int] | None, suffix: int
    ) -> Tensor:
        if state.ndim != 3 or grid is None or state.shape[1] != grid[0] * grid[1] + suffix:
            expected = "unknown" if grid is None else (
                f"{grid[0]}x{grid[1]} patches + {suffix} CLS = {grid[0] * grid[1] + suffix}"
            )
            raise ValueError(
                f"{where}: {name} expected (B, N, C) with the CLS token last ({expected} tokens), got "
                f"{tuple(state.shape)}; the tap does not guess which tokens are patches"
            )
        if self.tokens == "all":
            return state
        patches, cls = state[:, :-suffix], state[:, -suffix:]
        return patches if self.tokens == "patch" else pack([cls[:, :1], patches], "b * c")[0]

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


# Keyword names the Hugging Face processors use for the per-image grids, mapped to the tower's.
_GRID_ALIASES = {"image_grid_thw": "grid_thw"}


def _packing(
    where: str, backbone: Backbone, images: Tensor, model_kwargs: dict[str, Any]
) -> tuple[list[tuple[int, int]], Tensor | None, str]:
    """(per-image grids, gather index from block tokens to raster order or None, expected form).

    Checks the packed tower's inputs and moves processor-style keywords to the tower's names.
    """
    for alias, name in _GRID_ALIASES.items():
        if alias in model_kwargs:
            if name in model_kwargs:
                raise TypeError(f"{where}: expected one of {name}= and {alias}=, got both")
            model_kwargs[name] = model_kwargs.pop(alias)
    tower = type(backbone.entry).__name__
    layout = backbone.layout

    def need(key: str, columns: int) -> Tensor:
        value = model_kwargs.get(key)
        if not isinstance(value, Tensor) or value.ndim != 2 or value.shape[1] != columns:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{where}: {tower} expected {key}= a (num_images, {columns}) integer tensor, got {got}")
        if value.is_floating_point() or bool((value <= 0).any()):
            raise ValueError(f"{where}: {tower} expected {key}= positive integers, got {value.tolist()}")
        return value

    if layout.startswith("merge_window"):
        grid_thw = need("grid_thw", 3)
        m = backbone.merge_size
        sizes = grid_thw.prod(-1)
        if images.ndim != 2 or images.shape[0] != int(sizes.sum()):
            raise ValueError(
                f"{where}: {tower} expected flattened patches (N, C_in * T * P * P) with N = sum of t*h*w over "
                f"grid_thw = {int(sizes.sum())}, got shape {tuple(images.shape)}"
            )
        if bool((grid_thw[:, 1:] % m != 0).any()):
            raise ValueError(f"{where}: {tower} expected grid_thw heights and widths divisible by {m}, got {grid_thw.tolist()}")
        return (*_merge_window_index(backbone, grid_thw), "flat")
    if layout == "packed_raster":
        image_sizes = need("image_sizes", 2)
        if images.ndim != 4 or images.shape[0] != image_sizes.shape[0]:
            raise ValueError(
                f"{where}: {tower} expected images (B, C, H, W) with one image_sizes row per image, got images "
                f"{tuple(images.shape)} and image_sizes {tuple(image_sizes.shape)}"
            )
        p = backbone.patch_size
        too_big = (image_sizes > torch.tensor(images.shape[-2:], device=image_sizes.device)).any(-1)
        if bool(too_big.any()):
            raise ValueError(f"{where}: {tower} image_sizes {image_sizes.tolist()} exceed the image tensor's "
                             f"{tuple(images.shape[-2:])}")
        return [(int(h) // p, int(w) // p) for h, w in image_sizes.tolist()], None, "packed"
    if layout == "padded_positions":
        return _positions_index(where, tower, images, model_kwargs.get("pixel_position_ids"))
    # padded_raster: SigLIP2 NaFlex
    spatial_shapes = need("spatial_shapes", 2)
    mask = model_kwargs.get("pixel_attention_mask")
    if images.ndim != 3 or spatial_shapes.shape[0] != images.shape[0]:
        raise ValueError(
            f"{where}: {tower} expected patches (B, max N, C_in * P * P) with one spatial_shapes row per image, got "
            f"{tuple(images.shape)} and spatial_shapes {tuple(spatial_shapes.shape)}"
        )
    lengths = spatial_shapes.prod(-1)
    positions = torch.arange(images.shape[1], device=lengths.device)
    valid = positions < lengths[:, None]
    if not isinstance(mask, Tensor) or mask.shape != images.shape[:2] or not torch.equal(mask.bool(), valid.to(mask.device)):
        raise ValueError(
            f"{where}: {tower} expected pixel_attention_mask= (B, max N) marking the first h*w patches of each "
            "image (the processor's padding); another mask would leave tokens the tap cannot place"
        )
    index = (torch.arange(images.shape[0], device=lengths.device)[:, None] * images.shape[1] + positions)[valid]
    return [(int(h), int(w)) for h, w in spatial_shapes.tolist()], index, "padded"


def _positions_index(
    where: str, tower: str, images: Tensor, positions: object
) -> tuple[list[tuple[int, int]], Tensor, str]:
    """Grids and raster-order gather index of padded tokens placed by (x, y) ids, (-1, -1) = padding.

    Each image's grid is one more than its largest (y, x); its valid tokens must cover that grid
    exactly once (in any order), else the layout is refused.
    """
    if images.ndim != 3 or not isinstance(positions, Tensor) or positions.shape != (*images.shape[:2], 2):
        got = tuple(positions.shape) if isinstance(positions, Tensor) else type(positions).__name__
        raise ValueError(
            f"{where}: {tower} expected patches (B, max N, C_in * P * P) and pixel_position_ids= (B, max N, 2) "
            f"(x, y) ids with (-1, -1) for padding, got patches {tuple(images.shape)} and ids {got}"
        )
    valid = (positions >= 0).all(-1)
    grids, keys, base = [], [], 0
    for b in range(images.shape[0]):  # grid bookkeeping per image; the tokens are gathered at once
        xy = positions[b][valid[b]]
        if xy.numel() == 0:
            raise ValueError(f"{where}: {tower} image {b} has no valid patch in pixel_position_ids")
        w, h = (int(v) + 1 for v in xy.max(0).values)
        raster = xy[:, 1] * w + xy[:, 0]
        if xy.shape[0] != h * w or torch.unique(raster).numel() != h * w:
            raise ValueError(
                f"{where}: {tower} image {b}: its {xy.shape[0]} valid patches do not cover the {h}x{w} grid of "
                "their position ids exactly once; the tap cannot place them"
            )
        grids.append((h, w))
        keys.append(base + raster)
        base += h * w
    rows = torch.arange(images.shape[0], device=positions.device)[:, None] * images.shape[1]
    flat = (rows + torch.arange(images.shape[1], device=positions.device))[valid]
    index = flat[torch.argsort(torch.cat(keys))]
    return grids, index, "padded"


def _merge_window_index(backbone: Backbone, grid_thw: Tensor) -> tuple[list[tuple[int, int]], Tensor]:
    """Per-frame grids and, for every token in raster order, its position in the block sequence.

    Qwen-VL processors emit each image's patches in 2x2 merge-window order (t, h/m, w/m, m, m);
    Qwen2.5-VL further reorders whole merge windows into attention windows before the blocks.
    """
    m = backbone.merge_size
    unit = m * m
    grids: list[tuple[int, int]] = []
    raster_to_packed = []
    windowed = backbone.layout == "merge_window_windowed"
    window_order, base, unit_base = [], 0, 0
    side = backbone.window_size // m // backbone.patch_size if windowed else 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // m, w // m
        y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        within = ((y // m) * gw + x // m) * unit + (y % m) * m + x % m
        for frame in range(t):
            grids.append((h, w))
            raster_to_packed.append(base + frame * h * w + within.reshape(-1))
        if windowed:
            f, uy, ux = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
            nww = -(-gw // side)
            key = ((f * -(-gh // side) + uy // side) * nww + ux // side) * side * side + (uy % side) * side + ux % side
            window_order.append(torch.argsort(key.reshape(-1), stable=True) + unit_base)
        base += t * h * w
        unit_base += t * gh * gw
    index = torch.cat(raster_to_packed)
    if windowed:
        # Block position j holds the processor's merge window window_index[j]; invert it.
        window_index = torch.cat(window_order)
        where_unit = torch.empty_like(window_index)
        where_unit[window_index] = torch.arange(window_index.numel())
        index = where_unit[index // unit] * unit + index % unit
    return grids, index.to(grid_thw.device)


def _unpack(where: str, backbone: Backbone, state: Any, index: Tensor | None, form: str) -> Tensor:
    """A packed tower's block output as (sum N_i, C), every image in raster order."""
    if isinstance(state, tuple | list) and state and isinstance(state[0], Tensor):
        state = state[0]
    name = f"{type(backbone.entry).__name__} ({backbone.blocks_path})"
    expected = {"flat": "(N, C)", "packed": "(1, N, C)", "padded": "(B, max N, C)"}[form]
    ok = isinstance(state, Tensor) and (
        (form == "flat" and state.ndim == 2) or (form == "packed" and state.ndim == 3 and state.shape[0] == 1)
        or (form == "padded" and state.ndim == 3)
    )
    if not ok:
        got = tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__
        raise ValueError(f"{where}: block outputs of {name} expected {expected}, got {got}")
    flat = state.flatten(0, -2)
    if index is None:
        return flat
    if form == "flat" and flat.shape[0] != index.numel():
        raise ValueError(f"{where}: block outputs of {name} hold {flat.shape[0]} tokens, the grids {index.numel()}")
    return flat.index_select(0, index.to(flat.device))
