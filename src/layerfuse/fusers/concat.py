"""Channel concatenation of selected layers and of layer-group means (Dense Connector SCI/DCI, Lin et
al. E_D, the 3-18-23 fusion, LLaVA-NeXT ``slicefour``, ViP-LLaVA)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import (
    check_bool,
    check_feature_list,
    check_float,
    check_positive_int,
    check_same_tokens,
    check_widths,
    factory_kwargs,
)
from ..ops.layer_mean import layer_mean
from .base import Fuser
from .packed import fuse_packed, is_packed

__all__ = ["ConcatFuser", "Term"]

Term = int | Sequence[int]
"""One channel block of the output: an input index, or a sequence of input indices to average."""


def _normalise_terms(where: str, terms: Sequence[Term], num_inputs: int) -> tuple[tuple[int, ...], ...]:
    if isinstance(terms, (str, bytes)) or not isinstance(terms, Sequence) or len(terms) == 0:
        raise TypeError(
            f"{where}: terms expected a non-empty sequence of input indices or index groups, got {terms!r}"
        )
    normalised = []
    for t, term in enumerate(terms):
        group = (term,) if isinstance(term, int) else term
        if (
            isinstance(group, (str, bytes))
            or not isinstance(group, Sequence)
            or len(group) == 0
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in group)
        ):
            raise TypeError(
                f"{where}: terms[{t}] expected an input index or a non-empty sequence of input indices, "
                f"got {term!r}"
            )
        for i in group:
            if not 0 <= i < num_inputs:
                raise ValueError(
                    f"{where}: terms[{t}] refers to input {i}, but there are {num_inputs} inputs (0..{num_inputs - 1})"
                )
        if len(set(group)) != len(group):
            raise ValueError(f"{where}: terms[{t}] lists an input twice: {list(group)}")
        normalised.append(tuple(int(i) for i in group))
    unused = sorted(set(range(num_inputs)) - {i for g in normalised for i in g})
    if unused:
        # an input fed but never read is almost always a wrong layer list; refuse instead of skipping it
        raise ValueError(f"{where}: inputs {unused} are not used by any term; terms={list(terms)}")
    return tuple(normalised)


class ConcatFuser(Fuser):
    r"""Concatenate, on channels, chosen input layers and means of groups of input layers.

    The output is ``[T_0 ; T_1 ; ...]`` (channel axis) where each term ``T_t`` is one input
    ``features[i]`` (term ``i``) or the arithmetic mean of several inputs (term ``(i, j, ...)``).
    Terms may share inputs, so Dense Connector DCI's second group, which contains the base layer
    again, is ``terms=[23, range(0, 12), range(12, 24)]`` over inputs = hidden states 0..23. Followed
    by one Linear, a channel concatenation equals the sum of per-layer Linears with the column blocks
    of its weight (specs §0.7).

    Group means accumulate in float32 under bf16/fp16 (float64 stays float64) and are cast back to
    the input dtype. The optional LayerNorm over the concatenated width is ViP-LLaVA's
    ``projector_layernorm`` (HF ``VipLlavaMultiModalProjector``, eps 1e-5).

    Args:
        in_dims: channel width of each input, in input order.
        terms: the output channel blocks, in order; each an input index or a sequence of input
            indices to average (the members of a group must share one width). Default: every input
            once, in input order. Every input must be used.
        norm: apply a LayerNorm (with affine parameters) over the concatenated width. Default: ``False``
        eps: the LayerNorm epsilon. Default: ``1e-5``
        drop_first_token: drop token 0 of every input before fusing. This reproduces Lin et al.'s
            tower, which strips token 0 even from SigLIP (no CLS), losing a real patch (specs §3.9);
            with a CLS-token tower, drop the CLS with the tap (``tokens="patch"``) instead.
            Default: ``False``

    Shape:
        - features: ``len(in_dims)`` tensors (B, N, C_i) (N + 1 tokens with ``drop_first_token``)
        - output: (B, N, out_dim) with ``out_dim`` the sum of the term widths

    Examples:
        >>> dci = ConcatFuser([1024] * 24, terms=[23, range(0, 12), range(12, 24)])
        >>> feats = [torch.randn(2, 576, 1024) for _ in range(24)]
        >>> dci(feats).shape
        torch.Size([2, 576, 3072])
        >>> ConcatFuser.from_preset("lin_ed_3_18_23", dim=1024, depth=24).out_dim
        3072
    """

    terms: tuple[tuple[int, ...], ...]
    norm_enabled: bool
    eps: float
    drop_first_token: bool

    def __init__(
        self,
        in_dims: Sequence[int],
        terms: Sequence[Term] | None = None,
        *,
        norm: bool = False,
        eps: float = 1e-5,
        drop_first_token: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        where = "ConcatFuser"
        if isinstance(in_dims, int) or not isinstance(in_dims, Sequence) or len(in_dims) == 0:
            raise TypeError(f"{where}: in_dims expected a non-empty sequence of widths, got {in_dims!r}")
        self.in_dims = tuple(check_positive_int(where, f"in_dims[{i}]", c) for i, c in enumerate(in_dims))
        terms = list(range(len(self.in_dims))) if terms is None else terms
        self.terms = _normalise_terms(where, terms, len(self.in_dims))
        for t, group in enumerate(self.terms):
            widths = {self.in_dims[i] for i in group}
            if len(widths) != 1:
                raise ValueError(
                    f"{where}: terms[{t}] averages inputs {list(group)} of different widths "
                    f"{[self.in_dims[i] for i in group]}"
                )
        self.out_dim = sum(self.in_dims[g[0]] for g in self.terms)
        dd = factory_kwargs(where, device, dtype)
        self.norm_enabled = check_bool(where, "norm", norm)
        self.eps = check_float(where, "eps", eps, low=0.0, low_open=True)
        self.drop_first_token = check_bool(where, "drop_first_token", drop_first_token)
        self.norm: nn.LayerNorm | None = (
            nn.LayerNorm(self.out_dim, eps=self.eps, **dd) if self.norm_enabled else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.norm is not None:
            self.norm.reset_parameters()

    @classmethod
    def _plan_arguments(cls, dim: int, num_inputs: int, options: dict[str, Any]) -> dict[str, Any]:
        return {"in_dims": [dim] * num_inputs, **options}

    def forward(
        self,
        features: Sequence[Tensor],
        grid: Sequence[int] | None = None,
        level_grids: Sequence[Sequence[int]] | None = None,
        *,
        text: Tensor | None = None,
    ) -> Tensor:
        """Fuse `features`; `grid` and `level_grids` are accepted when they fit the tokens (see
        [`Fuser`][layerfuse.Fuser]), `text` is refused."""
        where = "ConcatFuser.forward"
        if is_packed(features):  # token-wise: the packed sequence as a batch of one
            return fuse_packed(where, self.forward, features, out_dim=self.out_dim, text=text)
        grid = self._call_args(where, features, grid, text)
        feats = check_feature_list(where, features, length=self.num_inputs)
        check_widths(where, feats, self.in_dims)
        tokens = check_same_tokens(where, feats)
        self._check_token_layout(where, features, tokens, grid, level_grids)
        if self.drop_first_token:
            if tokens < 2:
                raise ValueError(f"{where}: drop_first_token needs at least 2 tokens, got {tokens}")
            feats = [f[:, 1:] for f in feats]
        blocks = [feats[g[0]] if len(g) == 1 else layer_mean([feats[i] for i in g]) for g in self.terms]
        out = torch.cat(blocks, dim=-1) if len(blocks) > 1 else blocks[0]
        if self.norm is not None:
            out = self.norm(out)
        return out

    def get_config(self) -> dict[str, Any]:
        return {
            "in_dims": list(self.in_dims),
            "terms": [g[0] if len(g) == 1 else list(g) for g in self.terms],
            "norm": self.norm_enabled,
            "eps": self.eps,
            "drop_first_token": self.drop_first_token,
            **self._preset_config(),
        }

    def extra_repr(self) -> str:
        terms = ", ".join(str(g[0]) if len(g) == 1 else f"mean{list(g)}" for g in self.terms)
        uniform = len(set(self.in_dims)) == 1
        dims = f"[{self.in_dims[0]}] * {self.num_inputs}" if uniform else str(list(self.in_dims))
        text = f"in_dims={dims}, terms=[{terms}], out_dim={self.out_dim}"
        if self.norm_enabled:
            text += f", norm=True, eps={self.eps}"
        if self.drop_first_token:
            text += ", drop_first_token=True"
        return text
