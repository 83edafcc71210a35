"""IGVA's weight allocator: an instruction embedding attends to K layer-group summaries -> K weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .._checks import check_bool, check_module_inputs, check_positive_int, check_tensor, factory_kwargs
from ..ops.attention import attention
from ..ops.layer_mean import accumulation_dtype

__all__ = ["GateAttention", "GateBlock", "InstructionGate"]

# b batch, q queries (1 here), k keys (layer groups), h heads, d head width, c channels


class GateAttention(nn.Module):
    r"""Multi-head attention with ``nn.MultiheadAttention``'s parameter layout and initialisation.

    Queries, keys and values are projected by the rows of one packed ``in_proj_weight`` (q, k, v in
    that order), heads attend with scaled dot products, and ``mix_heads`` mixes the heads. The state
    dict is that of ``nn.MultiheadAttention(dim, num_heads, batch_first=True)`` (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``) with ``out_proj`` named ``mix_heads``: OPT's
    and MPT's attention output layers are called ``out_proj``, and LoRA name lists built from the LLM
    match leaf names anywhere in the model. The attention itself is
    [`layerfuse.ops.attention.attention`][layerfuse.ops.attention.attention] (float32 softmax under bf16/fp16). No mask, no dropout.

    Args:
        dim: model width c (query, key and value width).
        num_heads: heads; must divide ``dim``.

    Shape:
        - query: (B, Q, c); key_value: (B, K, c); output: (B, Q, c)

    Examples:
        >>> attn = GateAttention(1024, 4)
        >>> attn(torch.randn(2, 1, 1024), torch.randn(2, 4, 1024)).shape
        torch.Size([2, 1, 1024])
    """

    dim: int
    num_heads: int

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = factory_kwargs("GateAttention", device, dtype)
        if dim % num_heads != 0:
            raise ValueError(f"GateAttention: num_heads={num_heads} must divide dim={dim}")
        self.dim, self.num_heads = dim, num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim, **dd))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim, **dd))
        self.mix_heads = nn.Linear(dim, dim, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.MultiheadAttention's init: Xavier on the packed projection, zero biases, default output weight
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        self.mix_heads.reset_parameters()
        nn.init.zeros_(self.mix_heads.bias)

    def forward(self, query: Tensor, key_value: Tensor) -> Tensor:
        w_q, w_kv = self.in_proj_weight.split([self.dim, 2 * self.dim])
        b_q, b_kv = self.in_proj_bias.split([self.dim, 2 * self.dim])
        q = rearrange(F.linear(query, w_q, b_q), "b q (h d) -> b h q d", h=self.num_heads)
        k, v = F.linear(key_value, w_kv, b_kv).chunk(2, dim=-1)
        k = rearrange(k, "b k (h d) -> b h k d", h=self.num_heads)
        v = rearrange(v, "b k (h d) -> b h k d", h=self.num_heads)
        out = rearrange(attention(q, k, v), "b h q d -> b q (h d)")
        return self.mix_heads(out)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"


class GateBlock(nn.Module):
    r"""One post-norm cross-attention block of the gate (IGVA's ``transformers.{t}``).

    ``u = norm1(x + attn(x, kv))``, ``out = norm2(u + ffn(u))`` with ``ffn = Linear(c, c), ReLU,
    Linear(c, c)`` (no expansion, as in the authors' module). The keys/values ``kv`` are the same for
    every block.

    Args:
        dim: width c.
        num_heads: attention heads; must divide ``dim``.

    Shape:
        - x: (B, Q, c); kv: (B, K, c); output: (B, Q, c)
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = factory_kwargs("GateBlock", device, dtype)
        self.cross_attention = GateAttention(dim, num_heads, **dd)
        self.ffn = nn.Sequential(nn.Linear(dim, dim, **dd), nn.ReLU(), nn.Linear(dim, dim, **dd))
        self.norm1 = nn.LayerNorm(dim, **dd)
        self.norm2 = nn.LayerNorm(dim, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.cross_attention.reset_parameters()
        for module in (self.ffn[0], self.ffn[2], self.norm1, self.norm2):
            module.reset_parameters()

    def forward(self, x: Tensor, kv: Tensor) -> Tensor:
        u = self.norm1(x + self.cross_attention(x, kv))
        return self.norm2(u + self.ffn(u))

    def extra_repr(self) -> str:
        return f"dim={self.cross_attention.dim}, num_heads={self.cross_attention.num_heads}"


class InstructionGate(nn.Module):
    r"""Softmax weights over K layer groups, chosen by an instruction embedding (IGVA's aggregator).

    The instruction embedding, projected to width ``dim`` by ``sentence_proj``, is the single query of
    ``num_blocks`` post-norm cross-attention blocks (`GateBlock`) whose keys and values are the K
    group summaries projected by ``cls_proj`` (the same keys for every block). ``linear`` maps the final
    query to K logits and a softmax, computed in float32 (float64 stays float64), gives the weights.

    Parameter names equal the authors' ``vision_aggregator`` keys (``sentence_proj``, ``cls_proj``,
    ``transformers.{t}.cross_attention.in_proj_weight``, ``ffn.{0,2}``, ``norm1``, ``norm2``,
    ``linear``) except ``cross_attention.out_proj``, named ``cross_attention.mix_heads`` here (see
    ``GateAttention``); [`from_official`][layerfuse.from_official] renames it.

    Args:
        text_dim: width E of the instruction embedding (768 for ``all-mpnet-base-v2``).
        summary_dim: width C of the group summaries (the vision width).
        num_groups: K.
        dim: gate width h. Default: ``1024``
        num_blocks: blocks T. Default: ``4``
        num_heads: heads per block; must divide ``dim``. Default: ``4``
        summary_norm: apply a LayerNorm (``summary_norm``) to the summaries before ``cls_proj``. Mid-layer
            CLS vectors of CLIP have large norms while the instruction is unit-norm. Off in the authors'
            model. Default: ``False``
        zero_init_head: initialise ``linear`` to zero so the weights start exactly uniform (1/K),
            continuing a stage-1 model trained on the uniform mean. Default: ``False`` (PyTorch's Linear
            init, as the authors).

    Shape:
        - text: (B, E); summaries: (B, K, C); output: (B, K) in float32 (float64 for float64 inputs),
          rows summing to 1

    Examples:
        >>> gate = InstructionGate(768, 1024, 4)
        >>> weights = gate(torch.randn(2, 768), torch.randn(2, 4, 1024))
        >>> weights.shape, torch.allclose(weights.sum(-1), torch.ones(2))
        (torch.Size([2, 4]), True)
    """

    text_dim: int
    summary_dim: int
    num_groups: int
    dim: int
    num_blocks: int
    num_heads: int
    zero_init_head: bool

    def __init__(
        self,
        text_dim: int,
        summary_dim: int,
        num_groups: int,
        dim: int = 1024,
        num_blocks: int = 4,
        num_heads: int = 4,
        *,
        summary_norm: bool = False,
        zero_init_head: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        where = "InstructionGate"
        for name, value in (
            ("text_dim", text_dim), ("summary_dim", summary_dim), ("num_groups", num_groups),
            ("dim", dim), ("num_blocks", num_blocks), ("num_heads", num_heads),
        ):
            check_positive_int(where, name, value)
        if dim % num_heads != 0:
            raise ValueError(f"{where}: num_heads={num_heads} must divide dim={dim}")
        check_bool(where, "summary_norm", summary_norm)
        check_bool(where, "zero_init_head", zero_init_head)
        dd = factory_kwargs(where, device, dtype)
        self.text_dim, self.summary_dim, self.num_groups = text_dim, summary_dim, num_groups
        self.dim, self.num_blocks, self.num_heads = dim, num_blocks, num_heads
        self.zero_init_head = zero_init_head
        if summary_norm:
            self.summary_norm = nn.LayerNorm(summary_dim, **dd)
        else:
            self.register_module("summary_norm", None)
        self.sentence_proj = nn.Linear(text_dim, dim, **dd)
        self.cls_proj = nn.Linear(summary_dim, dim, **dd)
        self.transformers = nn.ModuleList(GateBlock(dim, num_heads, **dd) for _ in range(num_blocks))
        self.linear = nn.Linear(dim, num_groups, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.summary_norm is not None:
            self.summary_norm.reset_parameters()
        self.sentence_proj.reset_parameters()
        self.cls_proj.reset_parameters()
        for block in self.transformers:
            block.reset_parameters()
        if self.zero_init_head:
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)
        else:
            self.linear.reset_parameters()

    def logits(self, text: Tensor, summaries: Tensor) -> Tensor:
        """The K logits before the softmax, (B, K), in the parameters' dtype."""
        if self.summary_norm is not None:
            summaries = self.summary_norm(summaries)
        kv = self.cls_proj(summaries)
        x = self.sentence_proj(text).unsqueeze(1)
        for block in self.transformers:
            x = block(x, kv)
        return self.linear(x.squeeze(1))

    def forward(self, text: Tensor, summaries: Tensor) -> Tensor:
        where = "InstructionGate.forward"
        check_module_inputs(where, self, text=text, summaries=summaries)
        check_tensor(where, "text", text, shape=f"(B, {self.text_dim})", ndim=2, last=self.text_dim)
        check_tensor(
            where, "summaries", summaries, shape=f"(B, {self.num_groups}, {self.summary_dim})", ndim=3,
            last=self.summary_dim,
        )
        if summaries.shape[:2] != (text.shape[0], self.num_groups):
            raise ValueError(
                f"{where}: summaries expected shape ({text.shape[0]}, {self.num_groups}, {self.summary_dim}) "
                f"(B from text, K = num_groups), got {tuple(summaries.shape)}"
            )
        logits = self.logits(text, summaries)
        return logits.softmax(dim=-1, dtype=accumulation_dtype(logits.dtype))

    def extra_repr(self) -> str:
        extra = ", summary_norm=True" if self.summary_norm is not None else ""
        return (
            f"text_dim={self.text_dim}, summary_dim={self.summary_dim}, num_groups={self.num_groups}, "
            f"dim={self.dim}, num_blocks={self.num_blocks}, num_heads={self.num_heads}, "
            f"zero_init_head={self.zero_init_head}{extra}"
        )
