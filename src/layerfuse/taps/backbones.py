"""Find the block list, prefix tokens and patch embedding of a vision transformer by its structure.

No backbone library is imported here: timm, Hugging Face ``transformers`` and open_clip models are
recognised by the attributes they carry, which also keeps working across the module moves between
transformers 4.x and 5.x (``vision_model.encoder.layers`` became ``encoder.layers``, ViT's
``encoder.layer`` became ``layers``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from torch import nn

__all__ = ["BLOCK_PATHS", "LAYOUTS", "Backbone", "find_backbone"]

# Tried in order on the module the images go into; the first that holds a non-empty ModuleList or
# Sequential wins. "layers" is last because non-ViT models (Swin stages) use that name too.
BLOCK_PATHS = (
    "blocks",  # timm VisionTransformer, Eva, DeiT; layerfuse's demo ViT
    "trunk.blocks",  # open_clip TimmModel (SigLIP and other timm towers)
    "transformer.resblocks",  # open_clip VisionTransformer
    "encoder.layers",  # transformers CLIP / SigLIP (5.6+), and their inner *VisionTransformer (4.x)
    "encoder.layer",  # transformers Dinov2Model, Dinov2WithRegistersModel, ViTModel (< 5.9), DeiTModel
    "encoder.blocks",  # timm Qwen3 / DeepSeek / Gemma4 ViT classifiers
    "transformer.layers",  # transformers PixtralVisionModel
    "layers",  # transformers ViTModel (5.9+)
    "layer",  # transformers DINOv3ViTModel
)

# A multimodal model is tapped through its image tower, looked for before any block list so that a
# whole open_clip CLIP (whose TEXT tower sits at `transformer.resblocks`) is tapped on `visual`:
# transformers CLIPModel / SiglipModel keep it in `vision_model`, LLaVA-style VLMs in `vision_tower`,
# Qwen-VL / GLM-4V in `visual`, open_clip in `visual`.
TOWER_ATTRS = ("vision_model", "vision_tower", "visual")
# Wrappers followed only when the module has no block list itself: transformers' `model` inside
# *ForConditionalGeneration, TimmWrapperModel's `timm_model`, classification heads' backbones.
WRAPPER_ATTRS = ("model", "timm_model", "vit", "deit", "dinov2")

CLASS_TOKEN_NAMES = ("cls_token", "class_embedding", "class_token")
EXTRA_TOKEN_NAMES = ("register_tokens", "reg_token", "dist_token", "distillation_token")
# Parameters named like tokens inside these modules belong to a pooling head after the blocks
# (Aimv2's attention-pooling head has a `cls_token`), not to the token sequence the blocks see.
HEAD_NAMES = re.compile(r"(^|\.)(head|pooler|attn_pool|merger|head_\w*)(\.|$)")

# How the blocks lay out their tokens. "plain": (B, N, C) or (B, H, W, C), prefix tokens first, one
# grid for the batch. The packed, variable-resolution towers put images of different sizes in one
# sequence: "merge_window" (Qwen2-VL, Qwen3-VL, GLM-4V: (sum N_i, C) in 2x2 merge-window order),
# "merge_window_windowed" (Qwen2.5-VL: the same, reordered into attention windows before the blocks),
# "packed_raster" (Pixtral: (1, sum N_i, C), each image in raster order), "padded_raster" (SigLIP2
# NaFlex: (B, max N_i, C), each image's tokens first in raster order, then padding), "padded_positions"
# (Gemma 4 vision: (B, max N_i, C) padded, each token's (x, y) given by pixel_position_ids).
LAYOUTS = ("plain", "merge_window", "merge_window_windowed", "packed_raster", "padded_raster", "padded_positions")
PACKED_CLASSES = {
    "Qwen2VisionTransformerPretrainedModel": "merge_window",
    "Qwen3VLVisionModel": "merge_window",
    "Qwen3VLMoeVisionModel": "merge_window",
    "Glm4vVisionModel": "merge_window",
    "Glm4vMoeVisionModel": "merge_window",
    "Qwen2_5_VisionTransformerPretrainedModel": "merge_window_windowed",
    "PixtralVisionModel": "packed_raster",
    "Siglip2VisionModel": "padded_raster",
    "Siglip2VisionTransformer": "padded_raster",
    "Gemma4VisionModel": "padded_positions",
}


# Towers that append their CLS token after the patches instead of in front (Llama 4's vision encoder).
CLS_LAST_CLASSES = ("Llama4VisionModel",)


@dataclass(frozen=True)
class Refusal:
    """An architecture whose token layout the tap cannot verify, and what the user can do instead."""

    pattern: str  # regular expression matched against class names on the way to the blocks
    architecture: str
    reason: str
    instead: str
    explicit_ok: bool = False  # whether blocks= and num_prefix_tokens= given together lift the refusal


_HIERARCHICAL = "use the library's own forward_intermediates / output_hidden_states for its stage outputs"
REFUSALS = (
    Refusal(r"Xcit", "XCiT", "its CLS token joins after the patch blocks (in cls_attn_blocks), so the blocks hold "
            "no prefix token and the patch grid of its convolutional stem is not verifiable",
            "blocks='blocks', num_prefix_tokens=0, tokens='all' gives the patch blocks' tokens as they are", True),
    Refusal(r"CrossVit", "CrossViT", "it runs two branches at two patch sizes and every block returns a list of "
            "two token sequences", "timm's forward_features, or a LayerTap on a plain ViT"),
    Refusal(r"^Hiera", "Hiera", "its tokens are in mask-unit order, not raster order, and its stages pool them",
            _HIERARCHICAL),
    Refusal(r"^(Swin|DonutSwin|MaskFormerSwin)", "Swin", "it is a hierarchical backbone (not a "
            "plain ViT): its stages merge patches and its blocks return (B, H, W, C) windows of tokens",
            _HIERARCHICAL),
    Refusal(r"^(Twins|Pvt|PyramidVisionTransformer)", "PVT / Twins", "it is a hierarchical backbone (not a plain "
            "ViT): its stages downsample the tokens", _HIERARCHICAL),
    Refusal(r"^TNT", "TNT", "its blocks carry two token streams (pixel and patch tokens) and return a tuple",
            "timm's forward_intermediates"),
    Refusal(r"^PoolingVisionTransformer", "PiT", "its pooling stages change the token count and grid (and the "
            "distilled variant has two prefix tokens)", _HIERARCHICAL),
    Refusal(r"^Cait", "CaiT", "its CLS token joins after the patch blocks (in blocks_token_only)",
            "blocks='blocks', num_prefix_tokens=0 taps the patch blocks", True),
    Refusal(r"^ConVit", "ConViT", "its CLS token joins in the middle of the blocks (at local_up_to_layer)",
            "timm's forward_intermediates"),
    Refusal(r"^(DaVit|Davit|Florence2Vision)", "DaViT (Florence-2)", "it is a hierarchical backbone (not a plain "
            "ViT) with spatial and channel attention stages", _HIERARCHICAL),
    Refusal(r"^(MultiScaleVit|Mvit)", "MViTv2", "its stages pool the tokens", _HIERARCHICAL),
    Refusal(r"^Levit", "LeViT", "its stages downsample the tokens and its blocks are convolutional",
            _HIERARCHICAL),
    Refusal(r"^VOLO", "VOLO", "its outlooker stages work on (B, H, W, C) maps and its class attention adds the "
            "CLS token after the blocks", _HIERARCHICAL),
    Refusal(r"^ViTMAE", "ViTMAE", "it masks and shuffles the patch tokens at random before the blocks",
            "load its weights into a ViTModel and tap that"),
)


@dataclass(frozen=True)
class Backbone:
    """What a tap needs to know about a vision transformer.

    Attributes:
        family: library the model comes from (``"timm"``, ``"transformers"``, ``"open_clip"``,
            ``"layerfuse"``), or ``"custom"``.
        entry: the module the images are passed to (the image tower of a multimodal model).
        blocks: the transformer blocks, in execution order.
        blocks_path: dotted path of ``blocks`` inside the model given to the tap.
        num_prefix_tokens: tokens before the patch tokens (CLS, registers, distillation).
        has_class_token: whether the first prefix token is a CLS token.
        patch_embed: the module that turns the image into patches (gives the grid), if found.
        batch_first: whether blocks see (B, N, C); open_clip can run them as (N, B, C).
        layout: how the blocks lay out their tokens, one of ``LAYOUTS`` (``"plain"`` for a batch of
            images of one size; the others for packed, variable-resolution towers).
        merge_size: side of the merge window of a ``"merge_window*"`` tower (Qwen's
            ``spatial_merge_size``), else 1.
        patch_size: the patch side in pixels of a packed tower (Pixtral's ``image_sizes`` are in
            pixels), else 0.
        window_size: the attention-window side in pixels of a ``"merge_window_windowed"`` tower, else 0.
        num_suffix_tokens: tokens after the patch tokens (Llama 4 vision appends its CLS token last);
            ``has_class_token`` then refers to that last token.
    """

    family: str
    entry: nn.Module
    blocks: nn.Module
    blocks_path: str
    num_prefix_tokens: int
    has_class_token: bool
    patch_embed: nn.Module | None
    batch_first: bool = True
    layout: str = "plain"
    merge_size: int = 1
    patch_size: int = 0
    window_size: int = 0
    num_suffix_tokens: int = 0

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def packed(self) -> bool:
        """Whether the tower packs images of different sizes into one sequence (per-image grids)."""
        return self.layout != "plain"

    def grid_for(self, image_size: tuple[int, int]) -> tuple[int, int] | None:
        """The (H, W) patch grid for an image of ``image_size`` pixels, or ``None`` if unknown."""
        return patch_grid(self.patch_embed, image_size)


def patch_grid(patch_embed: nn.Module | None, image_size: tuple[int, int]) -> tuple[int, int] | None:
    """Exact patch grid of ``patch_embed`` for ``image_size``: timm's own rule, else the conv arithmetic."""
    if patch_embed is None:
        return None
    dynamic_feat_size = getattr(patch_embed, "dynamic_feat_size", None)
    if callable(dynamic_feat_size):  # timm PatchEmbed / HybridEmbed: knows its dynamic padding
        h, w = dynamic_feat_size(image_size)
        return int(h), int(w)
    if isinstance(patch_embed, nn.Unfold):  # Llama 4: unfold + linear, the conv arithmetic again
        pair = lambda v: tuple(v) if isinstance(v, tuple | list) else (v, v)  # noqa: E731
        return tuple(  # type: ignore[return-value]
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, p, d, k, s in zip(image_size, pair(patch_embed.padding), pair(patch_embed.dilation),
                                        pair(patch_embed.kernel_size), pair(patch_embed.stride))
        )
    conv = patch_embed if isinstance(patch_embed, nn.Conv2d) else getattr(patch_embed, "proj", None)
    if not isinstance(conv, nn.Conv2d):
        # A linear embedding of unfolded patches (timm Gemma4PatchEmbed): exact only where the patches
        # tile the image; the token count the blocks return is checked against this grid anyway.
        size = getattr(patch_embed, "patch_size", None)
        tiles = (
            isinstance(size, tuple) and len(size) == 2 and all(isinstance(p, int) and p > 0 for p in size)
            and image_size[0] % size[0] == 0 and image_size[1] % size[1] == 0
        )
        if tiles:
            return image_size[0] // size[0], image_size[1] // size[1]
        return None
    if isinstance(conv.padding, str) and conv.padding != "valid":
        return None
    padding = (0, 0) if isinstance(conv.padding, str) else conv.padding
    return tuple(  # type: ignore[return-value]
        math.floor((size + 2 * p - d * (k - 1) - 1) / s) + 1
        for size, p, d, k, s in zip(image_size, padding, conv.dilation, conv.kernel_size, conv.stride)
    )


def find_backbone(model: nn.Module, *, blocks: str | None = None, num_prefix_tokens: int | None = None) -> Backbone:
    """Describe ``model`` for [`LayerTap`][layerfuse.taps.LayerTap], refusing layouts it cannot verify.

    Args:
        model: a timm, transformers or open_clip vision transformer, a multimodal model with an image
            tower (followed through ``vision_model``, ``vision_tower``, ``visual`` and wrappers such as
            ``model``), a packed variable-resolution tower (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V,
            Pixtral, SigLIP2 NaFlex), or any model whose block list is named by ``blocks``.
        blocks: dotted path of the block list inside ``model``; found by structure when ``None``.
        num_prefix_tokens: tokens before the patches; found from the model's parameters when ``None``.

    Returns:
        The [`Backbone`][layerfuse.taps.Backbone] description.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``blocks`` / ``num_prefix_tokens`` have the
            wrong type.
        ValueError: no block list is found, or the architecture's token layout cannot be verified
            (XCiT, CrossViT, Hiera, Swin, PVT/Twins, TNT, PiT, CaiT, ConViT, DaViT, MViTv2, LeViT,
            VOLO, ViTMAE, ...): the message names the architecture and what to pass.

    Examples:
        >>> from layerfuse.cli.demo_vit import DemoViT
        >>> backbone = find_backbone(DemoViT(image_size=32, patch_size=8, width=32, depth=4, heads=2))
        >>> backbone.blocks_path, backbone.num_prefix_tokens, backbone.grid_for((32, 48))
        ('blocks', 1, (4, 6))
    """
    where = "LayerTap"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model expected a torch.nn.Module, got {type(model).__name__}")
    if num_prefix_tokens is not None:
        if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int):
            raise TypeError(
                f"{where}: num_prefix_tokens expected an int >= 0, got {type(num_prefix_tokens).__name__} "
                f"{num_prefix_tokens!r}"
            )
        if num_prefix_tokens < 0:
            raise ValueError(f"{where}: num_prefix_tokens expected an int >= 0, got {num_prefix_tokens}")
    # torch.compile(model) wraps it; the compiled graph was traced without the tap's hooks (and would
    # not be re-traced for them), so the tap runs the original module. Compile the tap instead.
    model = _uncompiled(model)
    entry, prefix, visited = model, "", [model]
    if blocks is None:
        # A vision tower becomes the module the images go into; a wrapper (`model` of a VLM or of
        # DINOv3ViTModel, `timm_model`) is only a step on the way to the blocks or to the tower.
        node, inner = entry, ""
        while True:
            tower = next((a for a in TOWER_ATTRS if isinstance(getattr(node, a, None), nn.Module)), None)
            if tower is not None:
                entry = node = _uncompiled(getattr(node, tower))
                prefix, inner = f"{prefix}{inner}{tower}.", ""
                visited.append(entry)
                continue
            if any(_block_list(node, p) is not None for p in BLOCK_PATHS):
                break
            wrapper = next((a for a in WRAPPER_ATTRS if isinstance(getattr(node, a, None), nn.Module)), None)
            if wrapper is None:
                break
            node, inner = getattr(node, wrapper), f"{inner}{wrapper}."
            visited.append(node)
        found = next((p for p in BLOCK_PATHS if _block_list(node, p) is not None), None)
        path = None if found is None else inner + found
        _refuse_unverifiable(visited + ([_vit_module(entry, path.rpartition(".")[0])] if path else []), False)
        if path is None:
            raise ValueError(
                f"{where}: cannot find the transformer blocks of {type(model).__name__}; looked for "
                f"{', '.join(BLOCK_PATHS)} (and image towers under {', '.join(TOWER_ATTRS + WRAPPER_ATTRS)}). "
                "Pass blocks='dotted.path' to the block list (an nn.ModuleList or nn.Sequential) and "
                "num_prefix_tokens="
            )
    else:
        if not isinstance(blocks, str):
            raise TypeError(f"{where}: blocks expected a dotted path string, got {type(blocks).__name__}")
        path = blocks
        if _block_list(entry, path) is None:
            raise ValueError(
                f"{where}: blocks={blocks!r} expected the path of a non-empty nn.ModuleList or nn.Sequential "
                f"inside {type(model).__name__}, got {_describe(entry, path)}"
            )
        parts = path.split(".")
        visited += [entry.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]
        _refuse_unverifiable(visited, num_prefix_tokens is not None)
    block_list = _block_list(entry, path)
    parent_path = path.rpartition(".")[0]
    vit = _vit_module(entry, parent_path)
    detected_prefix, has_cls = _prefix_tokens(vit, block_list)
    if num_prefix_tokens is not None:
        # A CLS token is only assumed where one was seen (it then comes first, as in every family).
        has_cls = has_cls and num_prefix_tokens > 0
        detected_prefix = num_prefix_tokens
    parent = entry.get_submodule(parent_path) if parent_path else entry
    layout = next((PACKED_CLASSES[type(m).__name__] for m in visited if type(m).__name__ in PACKED_CLASSES), "plain")
    if layout != "plain":
        detected_prefix, has_cls = 0, False
    cls_last = any(type(m).__name__ in CLS_LAST_CLASSES for m in visited)
    if cls_last:
        detected_prefix, has_cls = 0, True
    config = getattr(entry, "config", None)
    return Backbone(
        family=type(entry).__module__.partition(".")[0] if _is_known(entry) else "custom",
        entry=entry,
        blocks=block_list,  # type: ignore[arg-type]
        blocks_path=prefix + path,
        num_prefix_tokens=detected_prefix,
        has_class_token=has_cls,
        patch_embed=_patch_embed(vit, block_list),  # type: ignore[arg-type]
        batch_first=bool(getattr(parent, "batch_first", True)),
        layout=layout,
        merge_size=int(getattr(entry, "spatial_merge_size", 1)) if layout.startswith("merge_window") else 1,
        patch_size=int(getattr(config, "patch_size", 0) or 0) if layout != "plain" else 0,
        window_size=int(getattr(entry, "window_size", 0) or 0) if layout == "merge_window_windowed" else 0,
        num_suffix_tokens=int(cls_last),
    )


def _uncompiled(module: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) holds, else ``module`` itself."""
    inner = getattr(module, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else module


def _refuse_unverifiable(modules: list[nn.Module], explicit: bool) -> None:
    """Raise for an architecture whose token layout the tap cannot verify (see ``REFUSALS``)."""
    for module in modules:
        name = type(module).__name__
        for refusal in REFUSALS:
            if re.search(refusal.pattern, name) and not (explicit and refusal.explicit_ok):
                raise ValueError(
                    f"LayerTap: {name} ({refusal.architecture}) is not a plain ViT whose token layout the tap "
                    f"can verify: {refusal.reason}. It refuses to guess; instead: {refusal.instead}"
                )


def _vit_module(entry: nn.Module, parent_path: str) -> nn.Module:
    """The innermost module on the way to the blocks that states its prefix tokens (timm), else ``entry``."""
    parts = parent_path.split(".") if parent_path else []
    for depth in range(len(parts), 0, -1):
        module = entry.get_submodule(".".join(parts[:depth]))
        if isinstance(getattr(module, "num_prefix_tokens", None), int):
            return module
    return entry


def _is_known(module: nn.Module) -> bool:
    return type(module).__module__.partition(".")[0] in ("timm", "transformers", "open_clip", "layerfuse")


def _block_list(root: nn.Module, path: str) -> nn.Module | None:
    try:
        found = root.get_submodule(path)
    except AttributeError:
        return None
    if isinstance(found, nn.ModuleList | nn.Sequential) and len(found) > 0:
        return found
    return None


def _describe(root: nn.Module, path: str) -> str:
    try:
        found = root.get_submodule(path)
    except AttributeError:
        return "no such submodule"
    return f"{type(found).__name__} with {len(found) if hasattr(found, '__len__') else 'no'} children"


def _outside(module: nn.Module, block_list: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named submodules of ``module`` that are not inside ``block_list``."""
    inside = {id(m) for m in block_list.modules()}
    return [(n, m) for n, m in module.named_modules() if id(m) not in inside]


def _prefix_tokens(owner: nn.Module, block_list: nn.Module) -> tuple[int, bool]:
    """(number of prefix tokens, has CLS) from timm's attribute or from the token parameters."""
    count = getattr(owner, "num_prefix_tokens", None)
    if isinstance(count, int) and not isinstance(count, bool):
        has_cls = getattr(owner, "cls_token", None) is not None or bool(getattr(owner, "has_class_token", False))
        return count, has_cls
    has_cls, extra = False, 0
    for module_name, module in _outside(owner, block_list):
        if HEAD_NAMES.search(module_name):
            continue
        for name, param in module.named_parameters(recurse=False):
            if name in CLASS_TOKEN_NAMES:
                has_cls = True
            elif name in EXTRA_TOKEN_NAMES:
                extra += param.shape[-2] if param.ndim >= 2 else 1
    return int(has_cls) + extra, has_cls


def _patch_embed(owner: nn.Module, block_list: nn.Module) -> nn.Module | None:
    timm_embed = getattr(owner, "patch_embed", None)
    if isinstance(timm_embed, nn.Module):
        return timm_embed
    return next((m for _, m in _outside(owner, block_list) if isinstance(m, nn.Conv2d | nn.Unfold)), None)
