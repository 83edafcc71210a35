"""Internal direct fusion (Lin et al.'s I_D): per-layer projectors added before mapped decoder layers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .._checks import check_positive_int, factory_kwargs
from ..layers.projector import Projector
from .base import InternalFusion

__all__ = ["InternalDirect"]


class InternalDirect(InternalFusion):
    r"""Lin et al.'s internal direct fusion (I_D): project each ViT layer, add it at the image tokens.

    Feature level i (one ViT layer's tokens) goes through its own projector and is added to the
    hidden states at the image-token positions immediately **before** decoder layer
    ``fused_layers[i]`` runs: ``h[b, image tokens] += projectors[i](features[i])``, with no gate, norm
    or scale, and text positions untouched (Lin et al., CVPR 2025, "Multi-Layer Visual Feature Fusion
    in MLLMs", their ``LlamaModel.forward`` with the attribute bug fixed). The add happens only in
    calls that hold the images (training and the generation prefill), never in cached decoding.
    Zero features (or zeroed projectors) leave the LLM's logits unchanged exactly.

    Lin et al.'s model also feeds the last listed layer to the LLM input through ``mm_projector_f``;
    pass ``input_projector="mlp2x_gelu"`` to hold that projector here too (``input_projector.*``),
    and splice ``fusion.input_projector(features)`` into the input embeddings yourself.

    Args:
        in_dim: ViT width C of every level.
        hidden_size: the LLM's hidden size H.
        fused_layers: decoder layer of each level (e.g. [`lin_layer_map`][layerfuse.internal.lin_layer_map]).
        projector: LLaVA projector kind of each level (``"mlp2x_gelu"``, ``"linear"``, ...).
            Default: ``"mlp2x_gelu"``
        input_projector: kind of the LLM-input projector, or ``None`` for none. Default: ``None``
        device: where to build the parameters.
        dtype: parameter dtype.

    Shape:
        - features[i]: (T, C), (images, tokens, C) or per-image (tokens, C), T = image tokens in the batch.
        - image_token_mask: (B, L) bool.

    Raises:
        ValueError: a non-positive width, bad ``fused_layers``, an unknown projector kind.

    Examples:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from layerfuse.internal import InternalDirect, lin_layer_map
        >>> llm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=8,
        ...                                    num_attention_heads=4, vocab_size=64))
        >>> fusion = InternalDirect(16, 32, lin_layer_map("3-18-23", 8)).attach(llm)
        >>> mask = torch.zeros(2, 10, dtype=torch.bool); mask[:, 2:6] = True
        >>> levels = [torch.randn(2, 4, 16) for _ in range(3)]
        >>> with fusion.inject(levels, mask):
        ...     logits = llm(inputs_embeds=torch.randn(2, 10, 32)).logits
        >>> logits.shape
        torch.Size([2, 10, 64])
    """

    def __init__(
        self,
        in_dim: int,
        hidden_size: int,
        fused_layers: Sequence[int],
        *,
        projector: str = "mlp2x_gelu",
        input_projector: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        where = "InternalDirect"
        super().__init__(fused_layers, where=where)
        check_positive_int(where, "in_dim", in_dim)
        check_positive_int(where, "hidden_size", hidden_size)
        dd: dict[str, Any] = factory_kwargs(where, device, dtype)
        self.in_dim, self.hidden_size, self.projector_kind = in_dim, hidden_size, projector
        self.projectors = nn.ModuleList(Projector(projector, in_dim, hidden_size, **dd) for _ in self.fused_layers)
        self.input_projector = None if input_projector is None else Projector(input_projector, in_dim, hidden_size, **dd)
        self.input_projector_kind = input_projector

    def get_config(self) -> dict[str, Any]:
        return {
            "in_dim": self.in_dim,
            "hidden_size": self.hidden_size,
            "fused_layers": list(self.fused_layers),
            "projector": self.projector_kind,
            "input_projector": self.input_projector_kind,
        }

    def extra_repr(self) -> str:
        return f"fused_layers={list(self.fused_layers)}"

    def _project(self, level: int, features: Tensor) -> Tensor:
        return self.projectors[level](features)

    def _register(self, level: int, layer: nn.Module) -> list[RemovableHandle]:
        return [self._pre_hook(level, layer)]
