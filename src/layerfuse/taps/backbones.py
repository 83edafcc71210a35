"""Find the block list, prefix tokens and patch embedding of a vision transformer by its structure.

No backbone library is imported here: timm, Hugging Face ``transformers`` and open_clip models are
recognised by the attributes they carry, which also keeps working across the module moves between
transformers 4.x and 5.x (``vision_model.encoder.layers`` became ``encoder.layers``, ViT's
``encoder.layer`` became ``layers``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

__all__ = ["BLOCK_PATHS", "Backbone", "find_backbone"]

# Tried in order on the module the images go into; the first that holds a non-empty ModuleList or
# Sequential wins. "layers" is last because non-ViT models (Swin stages) use that name too.
BLOCK_PATHS = (
    "blocks",  # timm VisionTransformer, Eva, DeiT; layerfuse's demo ViT
    "trunk.blocks",  # open_clip TimmModel (SigLIP and other timm towers)
    "transformer.resblocks",  # open_clip VisionTransformer
    "encoder.layers",  # transformers CLIP / SigLIP (5.6+), and their inner *VisionTransformer (4.x)
    "encoder.layer",  # transformers Dinov2Model, Dinov2WithRegistersModel, ViTModel (< 5.9)
    "layers",  # transformers ViTModel (5.9+)
)

# A multimodal model is tapped through its image tower: transformers CLIPModel / SiglipModel /
# *WithProjection keep it in `vision_model` (so did CLIPVisionModel in 4.x), open_clip in `visual`.
TOWER_ATTRS = ("vision_model", "visual")

CLASS_TOKEN_NAMES = ("cls_token", "class_embedding", "class_token")
EXTRA_TOKEN_NAMES = ("register_tokens", "reg_token", "dist_token")


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
    """

    family: str
    entry: nn.Module
    blocks: nn.Module
    blocks_path: str
    num_prefix_tokens: int
    has_class_token: bool
    patch_embed: nn.Module | None
    batch_first: bool = True

    @property
    def depth(self) -> int:
        return len(self.blocks)

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
    conv = patch_embed if isinstance(patch_embed, nn.Conv2d) else getattr(patch_embed, "proj", None)
    if not isinstance(conv, nn.Conv2d) or (isinstance(conv.padding, str) and conv.padding != "valid"):
        return None
    padding = (0, 0) if isinstance(conv.padding, str) else conv.padding
    return tuple(  # type: ignore[return-value]
        math.floor((size + 2 * p - d * (k - 1) - 1) / s) + 1
        for size, p, d, k, s in zip(image_size, padding, conv.dilation, conv.kernel_size, conv.stride)
    )


def find_backbone(model: nn.Module, *, blocks: str | None = None, num_prefix_tokens: int | None = None) -> Backbone:
    """Describe ``model`` for [`LayerTap`][layerfuse.taps.LayerTap].

    Args:
        model: a timm, transformers or open_clip vision transformer (or multimodal model with an image
            tower), or any model whose block list is named by ``blocks``.
        blocks: dotted path of the block list inside ``model``; found by structure when ``None``.
        num_prefix_tokens: tokens before the patches; found from the model's parameters when ``None``.
    """
    where = "LayerTap"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model expected a torch.nn.Module, got {type(model).__name__}")
    entry, prefix = model, ""
    if blocks is None:
        while not any(_block_list(entry, p) is not None for p in BLOCK_PATHS):
            tower = next((a for a in TOWER_ATTRS if isinstance(getattr(entry, a, None), nn.Module)), None)
            if tower is None:
                break
            entry, prefix = getattr(entry, tower), f"{prefix}{tower}."
        path = next((p for p in BLOCK_PATHS if _block_list(entry, p) is not None), None)
        if path is None:
            raise ValueError(
                f"{where}: cannot find the transformer blocks of {type(model).__name__}; looked for "
                f"{', '.join(BLOCK_PATHS)}. Pass blocks='dotted.path' to the block list "
                "(an nn.ModuleList or nn.Sequential) and num_prefix_tokens="
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
    block_list = _block_list(entry, path)
    parent_path = path.rpartition(".")[0]
    vit = _vit_module(entry, parent_path)
    detected_prefix, has_cls = _prefix_tokens(vit, block_list)
    if num_prefix_tokens is not None:
        if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int):
            raise TypeError(
                f"{where}: num_prefix_tokens expected an int >= 0, got {type(num_prefix_tokens).__name__} "
                f"{num_prefix_tokens!r}"
            )
        if num_prefix_tokens < 0:
            raise ValueError(f"{where}: num_prefix_tokens expected an int >= 0, got {num_prefix_tokens}")
        # A CLS token is only assumed where one was seen (it then comes first, as in every family).
        has_cls = has_cls and num_prefix_tokens > 0
        detected_prefix = num_prefix_tokens
    parent = entry.get_submodule(parent_path) if parent_path else entry
    return Backbone(
        family=type(entry).__module__.partition(".")[0] if _is_known(entry) else "custom",
        entry=entry,
        blocks=block_list,  # type: ignore[arg-type]
        blocks_path=prefix + path,
        num_prefix_tokens=detected_prefix,
        has_class_token=has_cls,
        patch_embed=_patch_embed(vit, block_list),  # type: ignore[arg-type]
        batch_first=bool(getattr(parent, "batch_first", True)),
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
    for _, module in _outside(owner, block_list):
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
    return next((m for _, m in _outside(owner, block_list) if isinstance(m, nn.Conv2d)), None)
