"""Internal modular fusion (Lin et al.'s I_M): gated cross-attention blocks in mapped decoder layers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from .._checks import check_choice, check_float, check_positive_int, factory_kwargs
from ..layers.projector import Projector
from .base import InternalFusion, _hidden_of, _output_hidden, _replace_output, _with_hidden

__all__ = ["GatedCrossAttentionBlock", "InternalModular", "TanhGate"]

MODES = ("corrected", "authors")


class TanhGate(nn.Module):
    """``tanh(weight) * x`` with a scalar ``weight`` (shape (1,)) initialised to 0, so the gated branch
    starts closed (Flamingo; Lin et al.'s ``ucross_xattn`` / ``ucross_xmlp``).

    Examples:
        >>> TanhGate()(torch.ones(2)).tolist()
        [0.0, 0.0]
    """

    def __init__(self, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.weight) * x


class _RMSNorm(nn.Module):
    """LLaMA RMSNorm, reduced in max(input dtype, float32) and returned in the input dtype."""

    def __init__(self, width: int, eps: float, *, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        compute = torch.promote_types(x.dtype, torch.float32)
        y = x.to(compute)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


class _CrossAttention(nn.Module):
    """Multi-head cross-attention without position embedding; GQA when ``num_kv_heads < num_heads``.
    Key names ``{q,k,v,o}_proj`` as in LLaMA attention and Lin et al.'s ``ucross_attn``."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, dd: dict[str, Any]) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False, **dd)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False, **dd)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False, **dd)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False, **dd)

    def forward(self, x: Tensor, kv: Tensor, allowed: Tensor) -> Tensor:
        batch, queries, _ = x.shape
        keys = kv.shape[1]
        q = self.q_proj(x).view(batch, queries, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(kv).view(batch, keys, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(kv).view(batch, keys, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim)
        # softmax accumulates in float32 at least (the authors' code: float32; fixtures: float64)
        compute = torch.promote_types(scores.dtype, torch.float32)
        scores = scores.to(compute).masked_fill(~allowed[:, None], torch.finfo(compute).min)
        probs = scores.softmax(dim=-1).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(batch, queries, self.heads * self.head_dim)
        return self.o_proj(out)


class _SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int, dd: dict[str, Any]) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False, **dd)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False, **dd)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GatedCrossAttentionBlock(nn.Module):
    r"""One I_M block: tanh-gated cross-attention to visual features, then a tanh-gated SwiGLU MLP.

    ``mode="corrected"`` (pre-norm residual, own RMSNorms, Flamingo-style):

    ```text
    h = h + tanh(a) * XAttn(RMSNorm_a(h), F)
    h = h + tanh(b) * MLP(RMSNorm_m(h))
    ```

    so with both gates at 0 the block returns ``h`` exactly. ``mode="authors"`` is the arithmetic of
    Lin et al.'s ``ucross`` modules, applied to the normalised stream ``u`` of the decoder layer:
    ``u = u + tanh(a) * XAttn(u, F); u = u + tanh(b) * MLP(u)`` (no norms of its own).

    Keys: ``attn.{q,k,v,o}_proj.weight``, ``mlp.{gate,up,down}_proj.weight``, ``attn_gate.weight``,
    ``mlp_gate.weight`` and, corrected mode only, ``attn_norm.weight``, ``mlp_norm.weight``.

    Args:
        hidden_size: LLM width H.
        num_heads: query heads.
        num_kv_heads: key/value heads (divides ``num_heads``).
        head_dim: per-head width.
        intermediate_size: SwiGLU width.
        mode: ``"corrected"`` or ``"authors"``.
        eps: RMSNorm epsilon (corrected mode).
        device: where to build the parameters.
        dtype: parameter dtype.

    Shape:
        - h: (B, Q, H); features: (B, N, H); allowed: (B, Q, N) bool; active: (B,) bool or None;
          output: (B, Q, H) in h's dtype.

    Examples:
        >>> block = GatedCrossAttentionBlock(32, 4, 2, 8, 64, mode="corrected", eps=1e-6)
        >>> h = torch.randn(1, 5, 32)
        >>> torch.equal(block(h, torch.randn(1, 3, 32), torch.ones(1, 5, 3, dtype=torch.bool)), h)
        True
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        intermediate_size: int,
        *,
        mode: str,
        eps: float,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd: dict[str, Any] = factory_kwargs("GatedCrossAttentionBlock", device, dtype)
        self.mode = mode
        if mode == "corrected":
            self.attn_norm = _RMSNorm(hidden_size, eps, **dd)
            self.mlp_norm = _RMSNorm(hidden_size, eps, **dd)
        self.attn = _CrossAttention(hidden_size, num_heads, num_kv_heads, head_dim, dd)
        self.attn_gate = TanhGate(**dd)
        self.mlp = _SwiGLU(hidden_size, intermediate_size, dd)
        self.mlp_gate = TanhGate(**dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # LLaMA's initializer_range, which is how the authors' new modules were initialised
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(self.attn_gate.weight)
        nn.init.zeros_(self.mlp_gate.weight)
        if self.mode == "corrected":
            nn.init.ones_(self.attn_norm.weight)
            nn.init.ones_(self.mlp_norm.weight)

    def forward(self, h: Tensor, features: Tensor, allowed: Tensor, active: Tensor | None = None) -> Tensor:
        """h (B, Q, H), features (B, N, H), allowed (B, Q, N) bool, active (B,) bool or None (samples whose
        branches apply; the others are returned unchanged); returns (B, Q, H) in h's dtype."""
        corrected = self.mode == "corrected"
        x = self.attn_gate(self.attn(self.attn_norm(h) if corrected else h, features, allowed))
        h = h + self._only(x, active).to(h.dtype)
        x = self.mlp_gate(self.mlp(self.mlp_norm(h) if corrected else h))
        return h + self._only(x, active).to(h.dtype)

    @staticmethod
    def _only(x: Tensor, active: Tensor | None) -> Tensor:
        return x if active is None else torch.where(active[:, None, None], x, torch.zeros_like(x))


class InternalModular(InternalFusion):
    r"""Internal modular fusion (Lin et al.'s I_M): gated cross-attention blocks in mapped decoder layers.

    Level i is projected by ``projectors[i]`` (LLaVA projector, C -> H) into the keys/values of a
    [`GatedCrossAttentionBlock`][layerfuse.internal.GatedCrossAttentionBlock] working in decoder layer
    ``fused_layers[i]``. The queries are every position of the sequence, in the prefill and in every
    cached decoding step (the features stay held for the whole ``generate``).

    **The switch: ``mode``.**

    - ``"corrected"`` (default): the block runs just before the decoder layer with a standard
      pre-norm residual, so with both gates at 0 (their initial value) the LLM's logits are unchanged
      exactly; every query sees every image row of its own sample (samples without an image get no
      contribution); GQA LLMs are supported (``num_kv_heads``).
    - ``"authors"``: Lin et al.'s computation as coded (CVPR 2025, their ``LlamaDecoderLayer`` with the
      attribute bug fixed), which the reference fixtures check: the block acts on the layer's
      normalised input ``u = input_layernorm(h)``, the self-attention reads the modified ``u``, the
      residual is ``h``; the MLP residual is post-norm, ``out = g + MLP(g)`` with
      ``g = post_attention_layernorm(h)``, so even with gates at 0 a fused layer differs from the LLM;
      query position p sees image rows ``0..min(p, n-1)`` only (the first n columns of the causal +
      padding mask; n = image tokens per sample, equal for every sample). Needs LLaMA-style layers
      (``input_layernorm``, ``post_attention_layernorm``, ``mlp``).

    Args:
        in_dim: ViT width C.
        hidden_size: LLM hidden size H.
        fused_layers: decoder layer of each level.
        num_heads: cross-attention query heads (the LLM's ``num_attention_heads``).
        intermediate_size: width of the block's SwiGLU MLP (the LLM's ``intermediate_size``).
        num_kv_heads: key/value heads (GQA). Default: ``num_heads``
        head_dim: per-head width. Default: ``hidden_size // num_heads``
        mode: ``"corrected"`` or ``"authors"``. Default: ``"corrected"``
        projector: LLaVA projector kind per level. Default: ``"mlp2x_gelu"``
        input_projector: kind of an LLM-input projector held here (Lin's ``mm_projector_f``), or
            ``None``. Default: ``None``
        eps: RMSNorm epsilon of the corrected blocks. Default: 1e-6
        device: where to build the parameters.
        dtype: parameter dtype.

    Raises:
        ValueError: bad sizes, ``num_heads`` not a multiple of ``num_kv_heads``, unknown ``mode``.

    Examples:
        >>> fusion = InternalModular(16, 32, [5], num_heads=4, intermediate_size=64)
        >>> sorted(fusion.state_dict())[:3]
        ['blocks.0.attn.k_proj.weight', 'blocks.0.attn.o_proj.weight', 'blocks.0.attn.q_proj.weight']
    """

    def __init__(
        self,
        in_dim: int,
        hidden_size: int,
        fused_layers: Sequence[int],
        *,
        num_heads: int,
        intermediate_size: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        mode: str = "corrected",
        projector: str = "mlp2x_gelu",
        input_projector: str | None = None,
        eps: float = 1e-6,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        where = "InternalModular"
        super().__init__(fused_layers, where=where)
        for name, value in (("in_dim", in_dim), ("hidden_size", hidden_size), ("num_heads", num_heads),
                            ("intermediate_size", intermediate_size)):
            check_positive_int(where, name, value)
        check_choice(where, "mode", mode, MODES)
        num_kv_heads = num_heads if num_kv_heads is None else check_positive_int(where, "num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"{where}: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(f"{where}: hidden_size {hidden_size} is not divisible by num_heads {num_heads}; pass head_dim")
            head_dim = hidden_size // num_heads
        check_positive_int(where, "head_dim", head_dim)
        eps = check_float(where, "eps", eps, low=0.0, low_open=True)
        dd: dict[str, Any] = factory_kwargs(where, device, dtype)
        self.in_dim, self.hidden_size, self.mode = in_dim, hidden_size, mode
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.intermediate_size, self.eps = intermediate_size, eps
        self.projector_kind, self.input_projector_kind = projector, input_projector
        self.projectors = nn.ModuleList(Projector(projector, in_dim, hidden_size, **dd) for _ in self.fused_layers)
        self.blocks = nn.ModuleList(
            GatedCrossAttentionBlock(hidden_size, num_heads, num_kv_heads, head_dim, intermediate_size,
                                     mode=mode, eps=eps, **dd)
            for _ in self.fused_layers
        )
        self.input_projector = None if input_projector is None else Projector(input_projector, in_dim, hidden_size, **dd)
        self._residual: dict[int, Tensor] = {}

    def get_config(self) -> dict[str, Any]:
        return {
            "in_dim": self.in_dim,
            "hidden_size": self.hidden_size,
            "fused_layers": list(self.fused_layers),
            "num_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "mode": self.mode,
            "projector": self.projector_kind,
            "input_projector": self.input_projector_kind,
            "eps": self.eps,
        }

    def extra_repr(self) -> str:
        return f"fused_layers={list(self.fused_layers)}, mode={self.mode!r}"

    def _project(self, level: int, features: Tensor) -> Tensor:
        return self.projectors[level](features)

    # -- keys/values and masks -----------------------------------------------------------------------
    def _keys(self, level: int) -> tuple[Tensor, Tensor]:
        """Per-sample padded projected features (B, n_max, H) and which rows are real (B, n_max)."""
        call = self._call
        assert call is not None
        assert call.inputs is not None
        inputs = call.inputs
        values = self._projected(level)
        batch, n_max = len(inputs.counts), max(inputs.counts)
        index = (inputs.batch_index.to(values.device), inputs.slot_index.to(values.device))
        keys = values.new_zeros(batch, n_max, values.shape[-1]).index_put(index, values)
        real = torch.zeros(batch, n_max, dtype=torch.bool, device=values.device).index_put(
            index, torch.ones((), dtype=torch.bool, device=values.device)
        )
        return keys, real

    def _corrected(self, level: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        call = self._active_call()
        if call is None or max(call.inputs.counts) == 0:
            return None
        hidden = _hidden_of(args, kwargs)
        keys, real = self._keys(level)
        has_image = real.any(dim=1)
        # a sample without images attends to a zero row (no NaN); the block leaves that sample unchanged
        allowed = (real | ~has_image[:, None])[:, None, :].expand(-1, hidden.shape[1], -1)
        out = self.blocks[level](hidden, keys.to(hidden.dtype), allowed, has_image)
        return _with_hidden(args, kwargs, out)

    def _authors_mask(self, call: Any, queries: int, n: int, device: torch.device) -> Tensor:
        position = call.past_len + torch.arange(queries, device=device)
        allowed = torch.arange(n, device=device)[None, :] <= position[:, None]  # (Q, n), causal over image rows
        allowed = allowed[None].expand(len(call.inputs.counts), -1, -1)
        if call.attention_mask is not None:
            allowed = allowed & call.attention_mask[:, None, :n].to(device=device, dtype=torch.bool)
        return allowed

    def _authors_norm_out(self, level: int, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        call = self._active_call()
        if call is None:
            return None
        counts = call.inputs.counts
        if len(set(counts)) != 1 or counts[0] == 0:
            raise ValueError(
                f"InternalModular(mode='authors'): every sample needs the same number of image tokens (one image "
                f"block per sample, as the authors' code assumes), got per sample {counts}; use mode='corrected'"
            )
        u = _output_hidden(output)
        keys, _ = self._keys(level)
        allowed = self._authors_mask(call, u.shape[1], counts[0], u.device)
        return _replace_output(output, self.blocks[level](u, keys.to(u.dtype), allowed))

    def _authors_keep_residual(self, level: int, module: nn.Module, args: tuple) -> None:
        if self._active_call() is not None:
            self._residual[level] = args[0]

    def _authors_post_norm(self, level: int, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if self._active_call() is None:
            return None
        residual = self._residual.pop(level)
        # the layer adds its residual h; the authors' layer adds the normalised g instead
        return (args[0] + output) - residual

    def _register(self, level: int, layer: nn.Module) -> list[RemovableHandle]:
        if self.mode == "corrected":
            return [layer.register_forward_pre_hook(partial(self._corrected, level), with_kwargs=True)]
        parts = ("input_layernorm", "post_attention_layernorm", "mlp")
        missing = [p for p in parts if not isinstance(getattr(layer, p, None), nn.Module)]
        if missing:
            raise ValueError(
                f"InternalModular(mode='authors') needs LLaMA-style decoder layers with {', '.join(parts)}; "
                f"{type(layer).__name__} has no {', '.join(missing)}; use mode='corrected'"
            )
        return [
            layer.input_layernorm.register_forward_hook(partial(self._authors_norm_out, level)),
            layer.post_attention_layernorm.register_forward_pre_hook(partial(self._authors_keep_residual, level)),
            layer.mlp.register_forward_hook(partial(self._authors_post_norm, level)),
        ]
