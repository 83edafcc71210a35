"""Dense deep-query cross-attention: a deep ViT layer attends to all (or windowed) shallow tokens."""

# b batch, n tokens, c channels

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Final

import torch
from torch import Tensor, nn

from .._checks import check_bool, check_float, check_positive_int, factory_kwargs
from ..layers.attention import Attention
from ..layers.layer_scale import LayerScale
from ..layers.pos_embed import sincos_2d
from .deep_query import DeepQueryFuser
from .packed import PackedLayout, check_packed_call, is_packed

__all__ = ["CrossAttentionFuser"]


class CrossAttentionFuser(DeepQueryFuser):
    r"""Deep-query fusion with ordinary multi-head attention, optionally in local windows.

    The query layer Q (a deep, text-aligned ViT layer; MMFuser uses the penultimate block) attends to
    the tokens of the ``num_levels`` shallower layers F_l, concatenated. A learned per-level
    embedding E_l tells attention which layer a token came from, and a fixed 2-D sine-cosine code
    P ([`layerfuse.layers.sincos_2d`][layerfuse.layers.sincos_2d], in image-relative coordinates so grids of different size
    align) tells it where. Pre-norm blocks, each added back through a zero-initialised layer-scale:

    ```text
    kv = [norm_kv(F_0) + E_0 + P_0; ...; norm_kv(F_{L-1}) + E_{L-1} + P_{L-1}]
    x = Q + ls_cross(cross_attn(norm_q(Q) + P_q, kv))
    x = x + ls_self(self_attn(norm_self(x) + P_q))      # if self_attn
    x = x + ls_mlp(mlp(norm_mlp(x)))                     # if mlp_ratio > 0
    ```

    With ``layer_scale_init=0`` the output equals the query exactly at initialisation, so a pretrained
    single-layer projector keeps working. Attention runs on [`layerfuse.ops.attention.attention`][layerfuse.ops.attention.attention]
    (PyTorch SDPA's fused kernels by default), so the (N, L·N) attention matrix is never stored.

    With ``window=w`` each query attends only to the ``w × w`` tokens of each level around its own
    position (Cambrian SVA's spatial prior; the query grid is laid over each level's grid, see
    [`layerfuse.ops.attention.windowed_attention`][layerfuse.ops.attention.windowed_attention]), and the optional self-attention to the
    ``w × w`` neighbourhood in the query grid. Time and memory then grow linearly with the number of
    tokens, and the result equals full attention under the explicit
    [`window_mask`][layerfuse.ops.attention.window_mask].

    Leaf module names (``to_q``, ``to_kv``, ``to_out``, ``ffn_in``, ``ffn_out``) differ from the linear
    layer names of the common LLM families (``q_proj``, ``o_proj``, OPT's and Phi's ``fc1``/``fc2``,
    MPT's ``out_proj``, ...), which LoRA name lists match as suffixes anywhere in the model.

    Args:
        dim: channels C of every input layer (the ViT width) and of the output.
        num_levels: number of key/value layers L. Default: ``4``
        heads: attention heads; must divide ``dim`` (``dim / heads`` a multiple of 8 and at most 128
            keeps every fused kernel eligible). Default: ``16``
        window: local window side in tokens of each level, or ``None`` for full attention.
            Default: ``None``
        query_index: position of the query layer in ``features`` (negative counts from the end); the
            other entries, in order, are the key/value levels. Default: ``-1`` (last)
        grid: default (H, W) patch grid, used when ``forward`` gets no ``grid`` and the features carry
            none. Default: ``None``
        pos_embed: add the 2-D sine-cosine position code to queries and keys/values (needs the grids).
            Default: ``True``
        self_attn: add a self-attention refinement over the fused queries. Default: ``False``
        mlp_ratio: hidden width of a GELU MLP refinement as a multiple of ``dim``; ``0`` for none.
            Default: ``0.0``
        qkv_bias: biases on the query and key/value projections. Default: ``True``
        attn_drop: attention-weight dropout in training mode. Default: ``0.0``
        eps: epsilon of the LayerNorms. Default: ``1e-6``
        layer_scale_init: initial value of every layer-scale. Default: ``0.0``
        backend: attention backend (see [`layerfuse.ops.attention.attention`][layerfuse.ops.attention.attention]). Default: ``"auto"``

    Shape:
        - features: ``num_levels + 1`` tensors (B, N_i, C), patch tokens only, row-major on their
          grids; the query has N = H·W tokens
        - output: (B, N, C), the shape of the query

    Examples:
        >>> fuser = CrossAttentionFuser(1024, num_levels=4, heads=16, grid=(24, 24))
        >>> feats = [torch.randn(2, 576, 1024) for _ in range(5)]  # layers -22, -17, -12, -7, -2
        >>> out = fuser(feats)
        >>> out.shape, torch.equal(out, feats[-1])  # identity at initialisation
        (torch.Size([2, 576, 1024]), True)
    """

    window: Final[int | None]
    pos_embed: Final[bool]

    def __init__(
        self,
        dim: int,
        num_levels: int = 4,
        heads: int = 16,
        *,
        window: int | None = None,
        query_index: int = -1,
        grid: Sequence[int] | None = None,
        pos_embed: bool = True,
        self_attn: bool = False,
        mlp_ratio: float = 0.0,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        eps: float = 1e-6,
        layer_scale_init: float = 0.0,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        where = "CrossAttentionFuser"
        self._init_layout(where, dim, num_levels, heads, query_index, grid)
        if window is not None:
            check_positive_int(where, "window", window)
        for flag, value in (("pos_embed", pos_embed), ("self_attn", self_attn), ("qkv_bias", qkv_bias)):
            check_bool(where, flag, value)
        eps = check_float(where, "eps", eps, low=0.0, low_open=True)
        layer_scale_init = check_float(where, "layer_scale_init", layer_scale_init)
        mlp_ratio = check_float(where, "mlp_ratio", mlp_ratio, low=0.0)
        attn_drop = check_float(where, "attn_drop", attn_drop, low=0.0, high=1.0, high_open=True)
        if pos_embed and dim % 4:
            raise ValueError(f"{where}: pos_embed=True needs dim to be a multiple of 4, got dim={dim}")
        if mlp_ratio > 0 and round(dim * mlp_ratio) == 0:
            raise ValueError(f"{where}: mlp_ratio={mlp_ratio} gives an MLP of width 0 at dim={dim}")
        dd: dict[str, Any] = factory_kwargs(where, device, dtype)
        self.window, self.pos_embed = window, bool(pos_embed)
        self.mlp_ratio, self.qkv_bias, self.attn_drop = float(mlp_ratio), bool(qkv_bias), float(attn_drop)
        self.eps, self.layer_scale_init = eps, layer_scale_init

        def attn() -> Attention:
            return Attention(dim, heads, qkv_bias=qkv_bias, attn_drop=attn_drop, backend=backend, **dd)

        self.norm_q = nn.LayerNorm(dim, eps=eps, **dd)
        self.norm_kv = nn.LayerNorm(dim, eps=eps, **dd)
        self.level_embed = nn.Parameter(torch.empty(num_levels, dim, **dd))
        self.cross_attn = attn()
        self.ls_cross = LayerScale(dim, layer_scale_init, **dd)
        self.norm_self = nn.LayerNorm(dim, eps=eps, **dd) if self_attn else None
        self.self_attn = attn() if self_attn else None
        self.ls_self = LayerScale(dim, layer_scale_init, **dd) if self_attn else None
        hidden = round(dim * mlp_ratio)
        self.norm_mlp = nn.LayerNorm(dim, eps=eps, **dd) if hidden else None
        self.mlp = (
            nn.Sequential(
                OrderedDict(
                    ffn_in=nn.Linear(dim, hidden, **dd), act=nn.GELU(), ffn_out=nn.Linear(hidden, dim, **dd)
                )
            )
            if hidden
            else None
        )
        self.ls_mlp = LayerScale(dim, layer_scale_init, **dd) if hidden else None
        self.reset_parameters()

    @property
    def backend(self) -> str:
        return self.cross_attn.backend

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.level_embed, std=0.02)
        for child in self.children():
            if isinstance(child, nn.Sequential):
                for layer in child:
                    if isinstance(layer, nn.Linear):
                        layer.reset_parameters()
            elif hasattr(child, "reset_parameters"):
                child.reset_parameters()

    def get_config(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "num_levels": self.num_levels,
            "heads": self.heads,
            "window": self.window,
            "query_index": self.query_index,
            "grid": None if self.grid is None else list(self.grid),
            "pos_embed": self.pos_embed,
            "self_attn": self.self_attn is not None,
            "mlp_ratio": self.mlp_ratio,
            "qkv_bias": self.qkv_bias,
            "attn_drop": self.attn_drop,
            "eps": self.eps,
            "layer_scale_init": self.layer_scale_init,
            "backend": self.backend,
        }

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_levels={self.num_levels}, heads={self.heads}, window={self.window}, "
            f"query_index={self.query_index}, grid={self.grid}, pos_embed={self.pos_embed}"
        )

    def forward(
        self,
        features: Sequence[Tensor],
        grid: Sequence[int] | None = None,
        level_grids: Sequence[Sequence[int]] | None = None,
        *,
        text: Tensor | None = None,
    ) -> Tensor:
        """Fuse the key/value levels into the query layer.

        Args:
            features: ``num_levels + 1`` tensors (B, N_i, C): the key/value levels in order, with the
                query at ``query_index`` (by default last). A [`LayerFeatures`][layerfuse.LayerFeatures] from
                [`LayerTap`][layerfuse.LayerTap] carries its grid.
                A packed ``LayerFeatures`` (per layer (sum N_i, C), per-image ``grids``) is fused in
                one attention call per block (a key-padding mask, or one batch of every image's
                windows) and gives (sum N_i, C), equal to one call per image.
            grid: (H, W) of the query tokens, and of every level unless ``level_grids`` is given.
                Default: ``features.grid``, else the grid the module was built with. Needed for
                ``window`` and ``pos_embed``; without both, token counts are free.
            level_grids: one (H_l, W_l) per key/value level, in feature order, when the levels have
                different grids. Default: all equal to ``grid``.
            text: refused (``TypeError``): this fuser takes no instruction; accepted as ``None`` so every
                fuser shares one calling convention.

        Returns:
            (B, N, C), the fused query tokens.

        Raises:
            ValueError: an explicit ``grid`` that contradicts ``features.grid``, or grids that do not fit
                the token counts.
        """
        where = "CrossAttentionFuser.forward"
        if is_packed(features):  # images of different sizes: one attention call for the whole batch
            return self._forward_packed(where, features, grid, level_grids, text)
        self._call_args(where, features, grid, text)
        spatial = self.window is not None or self.pos_embed or grid is not None or level_grids is not None
        query, levels, query_grid, level_shapes = self._split(
            where, features, grid, level_grids, spatial=spatial
        )
        if self.window is not None:
            self._check_window(where, query_grid, level_shapes)

        kv = self.norm_kv(torch.cat(levels, dim=1))
        kv = kv + self._level_codes(levels, level_shapes, kv.dtype)
        q_in = self.norm_q(query)
        pos_q = sincos_2d(query_grid, self.dim, device=query.device, dtype=q_in.dtype) if self.pos_embed else None
        if pos_q is not None:
            q_in = q_in + pos_q
        window = {"window": self.window, "query_grid": query_grid, "context_grids": level_shapes}
        x = query + self.ls_cross(self.cross_attn(q_in, kv, **window))
        if self.self_attn is not None:
            y = self.norm_self(x)
            y = y if pos_q is None else y + pos_q
            x = x + self.ls_self(self.self_attn(y, window=self.window, query_grid=query_grid))
        if self.mlp is not None:
            x = x + self.ls_mlp(self.mlp(self.norm_mlp(x)))
        return x

    def _forward_packed(
        self, where: str, features: Any, grid: object, level_grids: object, text: Tensor | None
    ) -> Tensor:
        """A packed batch in one attention call per attention block; each image attends within itself.

        Full attention pads every image to the largest token count and masks the padded keys
        (a per-image key-padding mask); windowed attention puts the windows of all images, each
        image tiled within itself, into one batch of windows
        ([`packed_windowed_attention`][layerfuse.ops.attention.packed_windowed_attention]). Norms,
        codes and the MLP are token-wise and run on the packed tokens.
        """
        check_packed_call(where, features, grid, level_grids)
        self._call_args(where, features, None, text)
        layers = list(features)
        for i, t in enumerate(layers):
            if t.ndim != 2 or t.shape[-1] != self.dim:
                raise ValueError(f"{where}: features[{i}] of a packed batch expected shape (sum N_i, {self.dim}), "
                                 f"got {tuple(t.shape)}")
        query = layers[self._query_pos]
        grids = list(features.grids)
        if not grids:  # no images: an empty result
            return query.new_zeros(0, self.dim)
        levels = [t for i, t in enumerate(layers) if i != self._query_pos]
        if self.window is not None:
            for g in dict.fromkeys(grids):
                self._check_window(where, g, [g] * self.num_levels)
        dtype = query.dtype
        q_in = self.norm_q(query)
        pos = None
        if self.pos_embed:  # sincos_2d of each distinct grid, so every image gets its own call's codes
            codes = {g: sincos_2d(g, self.dim, device=query.device, dtype=q_in.dtype) for g in dict.fromkeys(grids)}
            pos = torch.cat([codes[g] for g in grids], dim=0)
            q_in = q_in + pos
        kv = []
        for level, f in enumerate(levels):
            code = self.level_embed[level].to(dtype)
            kv.append(self.norm_kv(f) + (code if pos is None else code + pos.to(dtype)))
        layout = PackedLayout(grids, device=query.device)
        if self.window is None:
            keep = layout.keep(spatial=False)
            padded_kv = torch.cat([layout.pad(t, spatial=False) for t in kv], dim=1)
            cross = self.cross_attn(layout.pad(q_in, spatial=False), padded_kv,
                                    mask=keep.repeat(1, self.num_levels)[:, None, None, :])
            cross = layout.unpad(cross, spatial=False)
        else:
            cross = self.cross_attn(q_in[None], layout.image_major(kv)[None], window=self.window,
                                    packed_grids=grids)[0]
        x = query + self.ls_cross(cross)
        if self.self_attn is not None:
            y = self.norm_self(x)
            y = y if pos is None else y + pos
            if self.window is None:
                y = self.self_attn(layout.pad(y, spatial=False), mask=keep[:, None, None, :])
                y = layout.unpad(y, spatial=False)
            else:
                y = self.self_attn(y[None], window=self.window, packed_grids=grids)[0]
            x = x + self.ls_self(y)
        if self.mlp is not None:
            x = x + self.ls_mlp(self.mlp(self.norm_mlp(x)))
        return x

    def _level_codes(
        self, levels: list[Tensor], shapes: list[tuple[int, int]] | None, dtype: torch.dtype
    ) -> Tensor:
        """(M, C): each key/value token's level embedding plus, with ``pos_embed``, its position code."""
        codes = []
        for level, f in enumerate(levels):
            code = self.level_embed[level].to(dtype).expand(f.shape[1], self.dim)
            if self.pos_embed and shapes is not None:
                code = code + sincos_2d(shapes[level], self.dim, device=f.device, dtype=dtype)
            codes.append(code)
        return torch.cat(codes, dim=0)

    def _check_window(self, where: str, query_grid: tuple[int, int], level_shapes: list[tuple[int, int]]) -> None:
        named = [(f"level {i}", g) for i, g in enumerate(level_shapes)]
        if self.self_attn is not None:
            named.append(("the query (self-attention)", query_grid))
        for name, (h, w) in named:
            if self.window > min(h, w):
                raise ValueError(
                    f"{where}: window={self.window} does not fit {name} with grid {(h, w)}; "
                    f"build the fuser with window <= {min(h, w)} or window=None"
                )
