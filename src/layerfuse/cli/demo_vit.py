"""A small CLIP-style vision transformer with random weights, so the demo runs without downloads.

Same layout as OpenAI CLIP's image tower (patch conv without bias, CLS token, learned position
embedding, pre-norm before the blocks, pre-norm blocks with attention and a GELU MLP), built from
core dependencies only. ``DemoViT.clip_l14_336()`` has the shape of CLIP ViT-L/14-336, the tower of
LLaVA-1.5 and of the multi-layer fusion papers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

__all__ = ["DemoBlock", "DemoViT"]

# b batch, n tokens, c channels, h heads, d head width, gh/gw patch grid


class DemoBlock(nn.Module):
    r"""Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``.

    Args:
        width: channels C.
        heads: attention heads (must divide ``width``).
        mlp_ratio: MLP hidden width over ``width``. Default: ``4.0``

    Shape:
        - x: (B, N, C); output: (B, N, C)
    """

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"DemoBlock: width expected a multiple of heads={heads}, got {width}")
        dd = {"device": device, "dtype": dtype}
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, **dd)
        self.qkv = nn.Linear(width, 3 * width, **dd)
        self.proj = nn.Linear(width, width, **dd)
        self.norm2 = nn.LayerNorm(width, **dd)
        self.fc1 = nn.Linear(width, int(width * mlp_ratio), **dd)
        self.fc2 = nn.Linear(int(width * mlp_ratio), width, **dd)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv(self.norm1(x)), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        attended = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(rearrange(attended, "b h n d -> b n (h d)"))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))

    def extra_repr(self) -> str:
        return f"heads={self.heads}"


class DemoViT(nn.Module):
    r"""CLIP-style ViT image tower with random weights; returns the last block's tokens.

    Args:
        image_size: square input side in pixels (the position embedding is built for it).
        patch_size: patch side in pixels.
        width: channels C.
        depth: number of blocks.
        heads: attention heads.
        in_chans: image channels. Default: ``3``

    Shape:
        - images: (B, in_chans, image_size, image_size); output: (B, 1 + G * G, C) with
          G = image_size // patch_size (CLS first).

    Examples:
        >>> vit = DemoViT.small()
        >>> vit(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 17, 64])
    """

    num_prefix_tokens = 1  # the CLS token; read by LayerTap

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        in_chans: int = 3,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"DemoViT: image_size expected a multiple of patch_size={patch_size}, got {image_size}")
        dd = {"device": device, "dtype": dtype}
        self.image_size, self.patch_size, self.width, self.depth = image_size, patch_size, width, depth
        self.grid = (image_size // patch_size, image_size // patch_size)
        self.patch_embed = nn.Conv2d(in_chans, width, patch_size, stride=patch_size, bias=False, **dd)
        self.cls_token = nn.Parameter(torch.empty(1, 1, width, **dd))
        self.pos_embed = nn.Parameter(torch.empty(1, 1 + self.grid[0] * self.grid[1], width, **dd))
        self.norm_pre = nn.LayerNorm(width, **dd)
        self.blocks = nn.ModuleList([DemoBlock(width, heads, **dd) for _ in range(depth)])
        self.reset_parameters()

    @classmethod
    def clip_l14_336(cls, *, device: torch.device | None = None, dtype: torch.dtype | None = None) -> DemoViT:
        """CLIP ViT-L/14-336 shape: 24 blocks, width 1024, 16 heads, 336 px -> 24 x 24 patches."""
        return cls._initialised(device, dtype, image_size=336, patch_size=14, width=1024, depth=24, heads=16)

    @classmethod
    def small(cls, *, device: torch.device | None = None, dtype: torch.dtype | None = None) -> DemoViT:
        """A tiny tower with the same 24-block depth (width 64, 64 px -> 4 x 4 patches), for quick runs."""
        return cls._initialised(device, dtype, image_size=64, patch_size=16, width=64, depth=24, heads=4)

    @classmethod
    def _initialised(cls, device: torch.device | None, dtype: torch.dtype | None, **shape: int) -> DemoViT:
        # Built on the meta device and filled once by reset_parameters: the children's own default
        # initialisation would otherwise run first and double the start-up time of the ViT-L shape.
        model = cls(**shape, device=torch.device("meta"), dtype=dtype)
        model.to_empty(device=device if device is not None else torch.device("cpu"))
        model.reset_parameters()
        return model

    def reset_parameters(self) -> None:
        # Uniform fills are several times cheaper than normal ones, which matters for the 300M
        # parameters of the ViT-L shape; the scale keeps activations O(1) through 24 random blocks.
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                bound = module.weight[0].numel() ** -0.5
                nn.init.uniform_(module.weight, -bound, bound)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        nn.init.uniform_(self.cls_token, -0.02, 0.02)
        nn.init.uniform_(self.pos_embed, -0.02, 0.02)

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"DemoViT.forward: images expected shape (B, C, {self.image_size}, {self.image_size}), "
                f"got {tuple(images.shape)}"
            )
        patches = rearrange(self.patch_embed(images), "b c gh gw -> b (gh gw) c")
        # torch.cat rather than einops.pack: pack reshapes with -1, which is ambiguous for B = 0.
        x = torch.cat([repeat(self.cls_token, "1 1 c -> b 1 c", b=images.shape[0]), patches], dim=1)
        x = self.norm_pre(x + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return x

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, patch_size={self.patch_size}, width={self.width}, depth={self.depth}"
