"""Text-conditioned gating over layer groups (IGVA, Li, Zheng et al., arXiv 2501.08443)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._checks import (
    check_bool,
    check_feature_list,
    check_module_inputs,
    check_positive_int,
    check_same_tokens,
    check_widths,
    factory_kwargs,
)
from ..features import LayerFeatures
from ..layers.instruction_gate import InstructionGate
from ..ops.layer_mean import accumulation_dtype, layer_mean
from .base import Fuser
from .packed import PackedLayout, check_packed_call, is_packed

__all__ = ["IGVA_GROUPS", "GatedFusion", "InstructionGatedFuser", "gate_entropy_loss"]

# b batch, k layer groups, t tokens (CLS + patches), n patch tokens, c channels

# The authors' four groups of CLIP-L's 24 blocks (hidden-state indices; the embedding output 0 is left out).
IGVA_GROUPS: tuple[tuple[int, ...], ...] = tuple(tuple(range(s, s + 6)) for s in (1, 7, 13, 19))


@dataclass
class GatedFusion:
    """What [`InstructionGatedFuser.forward_with_weights`][layerfuse.fusers.instruction_gated.InstructionGatedFuser.forward_with_weights] returns.

    Attributes:
        output: the fuser output ``[base ; fused]``, (B, N, 2C), in the features' dtype (what
            ``forward`` returns).
        weights: the weights over the K groups, (B, K), rows summing to 1, in float32 (float64 for
            float64 features). Uniform for a fuser built with ``gated=False``.
    """

    output: Tensor
    weights: Tensor


def _check_groups(where: str, groups: object) -> tuple[tuple[int, ...], ...]:
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence) or len(groups) == 0:
        raise TypeError(f"{where}: groups expected a non-empty sequence of index ranges, got {groups!r}")
    checked: list[tuple[int, ...]] = []
    seen: dict[int, int] = {}
    for g, group in enumerate(groups):
        if (
            isinstance(group, (str, bytes))
            or not isinstance(group, Sequence)
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in group)
        ):
            raise TypeError(f"{where}: groups[{g}] expected a sequence of ints (hidden-state indices), got {group!r}")
        group = tuple(int(i) for i in group)
        if len(group) == 0:
            raise ValueError(f"{where}: groups[{g}] is empty; every group needs at least one layer")
        if min(group) < 0:
            raise ValueError(
                f"{where}: groups[{g}] expected hidden-state indices >= 0 (0 = embedding output, k = block k), "
                f"got {list(group)}"
            )
        if group != tuple(range(group[0], group[0] + len(group))):
            raise ValueError(
                f"{where}: groups[{g}] expected a contiguous ascending range of layers, got {list(group)}"
            )
        for i in group:
            if i in seen:
                raise ValueError(f"{where}: layer {i} is in groups[{seen[i]}] and groups[{g}]; groups must not overlap")
            seen[i] = g
        checked.append(group)
    return tuple(checked)


def _ranges(groups: Sequence[Sequence[int]]) -> str:
    return "[" + ", ".join(f"{g[0]}..{g[-1]}" for g in groups) + "]"


class InstructionGatedFuser(Fuser):
    r"""IGVA: an instruction embedding chooses softmax weights over groups of layers.

    The hidden states are cut into K contiguous groups and each group is averaged (all tokens, summed in
    float32 under bf16/fp16). An [`InstructionGate`][layerfuse.layers.instruction_gate.InstructionGate] reads the
    instruction embedding and one summary vector per group (the CLS token of the group mean, or its
    mean patch token when the backbone has no CLS) and returns weights ``w`` (B, K) on the simplex. The
    fused map ``F = sum_k w_k Q_k`` mixes the groups' patch maps, and the output is ``[P_base ; F]`` on
    channels, the base layer first (the authors' column order), ready for a projector of input width 2C.

    ``features`` are the hidden states named by [`layers`][layerfuse.fusers.instruction_gated.InstructionGatedFuser.layers]: every layer of every group in order,
    then the base layer. With ``has_cls=True`` each carries the CLS token first (tap with
    ``tokens="cls_patch"``); the output has patch tokens only. The text encoder stays outside the module:
    ``text`` is a batch of embeddings (see `layerfuse.text`). Samples without an instruction (the
    dummy image of a text-only sample in LLaVA) take a zero row, as in the authors' code.

    ``gated=False`` builds the stage-1 model: no gate, the uniform mean of the K group maps. A gated
    fuser with ``zero_init_head=True`` starts out equal to it, so stage 2 continues stage 1 exactly.

    Args:
        dim: vision width C.
        text_dim: width E of the instruction embeddings. Default: ``768`` (``all-mpnet-base-v2``)
        groups: K contiguous ranges of hidden-state indices (0 = embedding output, k = block k).
            Default: `IGVA_GROUPS`, ``[[1..6], [7..12], [13..18], [19..24]]``
        base_layer: hidden-state index concatenated unchanged (negative counts from the end). It may also
            belong to a group, as the default does (23). Default: ``-2``
        gate_dim: gate width h. Default: ``1024``
        num_blocks: cross-attention blocks T of the gate. Default: ``4``
        num_heads: heads per block; must divide ``gate_dim``. Default: ``4``
        has_cls: the features start with a CLS token, used as the group summary. ``False`` for
            backbones without one (SigLIP): the summary is the group's mean patch token. Default: ``True``
        gated: build the gate; ``False`` is the stage-1 uniform average (``text`` must then be
            ``None``). Default: ``True``
        summary_norm: LayerNorm on the summaries before the gate (not in the authors' model).
            Default: ``False``
        zero_init_head: zero the gate's logit head so the weights start uniform. Default: ``False``
            (the authors' random init)

    Shape:
        - features: ``len(layers)`` tensors (B, T, C), T = 1 + N with ``has_cls`` else N
        - text: (B, E), any float dtype (cast to the features' dtype, as the authors do)
        - output: (B, N, 2C)

    Examples:
        >>> fuser = InstructionGatedFuser(1024, 768)
        >>> feats = [torch.randn(2, 577, 1024) for _ in fuser.layers]   # tap(fuser.layers, "cls_patch")
        >>> fuser(feats, text=torch.randn(2, 768)).shape
        torch.Size([2, 576, 2048])
    """

    dim: int
    text_dim: int
    groups: tuple[tuple[int, ...], ...]
    base_layer: int
    has_cls: bool
    gated: bool

    def __init__(
        self,
        dim: int,
        text_dim: int = 768,
        *,
        groups: Sequence[Sequence[int]] = IGVA_GROUPS,
        base_layer: int = -2,
        gate_dim: int = 1024,
        num_blocks: int = 4,
        num_heads: int = 4,
        has_cls: bool = True,
        gated: bool = True,
        summary_norm: bool = False,
        zero_init_head: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        where = "InstructionGatedFuser"
        check_positive_int(where, "dim", dim)
        check_positive_int(where, "text_dim", text_dim)
        factory_kwargs(where, device, dtype)
        if isinstance(base_layer, bool) or not isinstance(base_layer, int):
            raise TypeError(f"{where}: base_layer expected an int hidden-state index, got {base_layer!r}")
        for flag, value in (
            ("has_cls", has_cls), ("gated", gated), ("summary_norm", summary_norm), ("zero_init_head", zero_init_head)
        ):
            check_bool(where, flag, value)
        if not gated and (zero_init_head or summary_norm):
            raise ValueError(
                f"{where}: zero_init_head and summary_norm configure the gate; gated=False has no gate"
            )
        self.dim, self.text_dim = dim, text_dim
        self.groups = _check_groups(where, groups)
        self.base_layer = base_layer
        self.has_cls, self.gated = has_cls, gated
        self.in_dims = (dim,) * (sum(len(g) for g in self.groups) + 1)
        self.out_dim = 2 * dim
        if gated:
            self.gate = InstructionGate(
                text_dim, dim, len(self.groups), gate_dim, num_blocks, num_heads,
                summary_norm=summary_norm, zero_init_head=zero_init_head, device=device, dtype=dtype,
            )
        else:
            self.register_module("gate", None)
        self.reset_parameters()

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def layers(self) -> tuple[int, ...]:
        """Hidden-state indices ``forward`` expects, in order: the groups' layers, then the base layer."""
        return (*(i for g in self.groups for i in g), self.base_layer)

    @property
    def uses_text(self) -> bool:
        """``True`` for a gated fuser (``forward`` needs ``text``); ``False`` for ``gated=False``."""
        return self.gated

    @property
    def tokens(self) -> str:
        """The tap's token mode ``forward`` expects: ``"cls_patch"`` with ``has_cls``, else ``"patch"``."""
        return "cls_patch" if self.has_cls else "patch"

    def reset_parameters(self) -> None:
        if self.gate is not None:
            self.gate.reset_parameters()

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "dim": self.dim,
            "text_dim": self.text_dim,
            "groups": [list(g) for g in self.groups],
            "base_layer": self.base_layer,
            "has_cls": self.has_cls,
            "gated": self.gated,
        }
        if self.gate is not None:
            config.update(
                gate_dim=self.gate.dim,
                num_blocks=self.gate.num_blocks,
                num_heads=self.gate.num_heads,
                summary_norm=self.gate.summary_norm is not None,
                zero_init_head=self.gate.zero_init_head,
            )
        return config

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, text_dim={self.text_dim}, groups={_ranges(self.groups)}, "
            f"base_layer={self.base_layer}, has_cls={self.has_cls}, gated={self.gated}"
        )

    def _check_features(self, where: str, features: Sequence[Tensor]) -> list[Tensor]:
        feats = check_feature_list(where, features, length=self.num_inputs)
        check_widths(where, feats, self.in_dims)
        tokens = check_same_tokens(where, feats)
        if self.has_cls and tokens < 2:
            raise ValueError(
                f"{where}: has_cls=True expects a CLS token followed by patch tokens, got {tokens} token(s)"
            )
        if isinstance(features, LayerFeatures) and features.num_prefix_tokens != int(self.has_cls):
            hint = "tokens='cls_patch'" if self.has_cls else "tokens='patch'"
            raise ValueError(
                f"{where}: features carry {features.num_prefix_tokens} prefix token(s) (from the tap) but "
                f"has_cls={self.has_cls} expects {int(self.has_cls)}; tap with {hint}"
            )
        return feats

    def _check_text(self, where: str, text: object, feats: Sequence[Tensor]) -> None:
        if self.gate is None:
            if text is not None:
                raise ValueError(
                    f"{where}: text must be None for a fuser built with gated=False (the stage-1 uniform "
                    f"average has no gate), got {type(text).__name__}"
                )
            return
        if text is None:
            raise ValueError(
                f"{where}: text is required: the instruction embeddings (B, {self.text_dim}); use a zero row "
                "for a sample without an instruction"
            )
        if not isinstance(text, Tensor):
            raise TypeError(f"{where}: text expected a torch.Tensor (B, {self.text_dim}), got {type(text).__name__}")
        if not text.is_floating_point():
            raise TypeError(f"{where}: text expected a floating-point tensor, got dtype {text.dtype}")
        batch = feats[0].shape[0]
        if tuple(text.shape) != (batch, self.text_dim):
            raise ValueError(
                f"{where}: text expected shape (B, {self.text_dim}) with B={batch} (the features' batch), "
                f"got {tuple(text.shape)}"
            )
        if text.device != feats[0].device:
            raise ValueError(f"{where}: text is on {text.device} but the features are on {feats[0].device}")

    def _group_features(self, feats: Sequence[Tensor]) -> list[list[Tensor]]:
        out, start = [], 0
        for group in self.groups:
            out.append(list(feats[start:start + len(group)]))
            start += len(group)
        return out

    def _weights(self, summaries: Tensor, text: Tensor | None, dtype: torch.dtype) -> Tensor:
        if self.gate is None:
            return summaries.new_full(summaries.shape[:2], 1.0 / self.num_groups)
        # the gate runs in the features' dtype (the authors cast the instruction to the vision dtype);
        # its softmaxes run in float32
        return self.gate(text.to(dtype), summaries.to(dtype))  # type: ignore[union-attr]

    def group_means(self, features: Sequence[Tensor]) -> Tensor:
        """The K group means on all tokens, (B, K, T, C), in float32 (float64 for float64 features)."""
        check_module_inputs("InstructionGatedFuser.group_means", self, features=features)
        feats = self._check_features("InstructionGatedFuser.group_means", features)
        acc = accumulation_dtype(feats[0].dtype)
        return torch.stack([layer_mean(g, out_dtype=acc) for g in self._group_features(feats)], dim=1)

    def gate_weights(self, features: Sequence[Tensor], *, text: Tensor | None = None) -> Tensor:
        """The weights over the groups, (B, K), without building the fused map.

        Only the CLS tokens (or the per-layer mean patch tokens) are averaged, so this is cheap.
        """
        where = "InstructionGatedFuser.gate_weights"
        check_module_inputs(where, self, features=features, text=text, any_dtype=("text",))
        feats = self._check_features(where, features)
        self._check_text(where, text, feats)
        acc = accumulation_dtype(feats[0].dtype)
        if self.has_cls:
            parts = [layer_mean([f[:, 0] for f in g], out_dtype=acc) for g in self._group_features(feats)]
        else:
            parts = [
                layer_mean([f.mean(dim=1, dtype=acc) for f in g], out_dtype=acc)
                for g in self._group_features(feats)
            ]
        return self._weights(torch.stack(parts, dim=1), text, feats[0].dtype)

    def forward_with_weights(
        self,
        features: Sequence[Tensor],
        grid: Sequence[int] | None = None,
        level_grids: Sequence[Sequence[int]] | None = None,
        *,
        text: Tensor | None = None,
    ) -> GatedFusion:
        """[`forward`][layerfuse.fusers.instruction_gated.InstructionGatedFuser.forward] plus the gate weights (for inspection or [`gate_entropy_loss`][layerfuse.fusers.gate_entropy_loss])."""
        where = "InstructionGatedFuser.forward"
        if is_packed(features):  # images of different sizes: token-wise, one instruction per image
            return self._forward_packed(where, features, grid, level_grids, text)
        checked = self._call_args(where, features, grid, text, uses_text=True)
        feats = self._check_features(where, features)
        self._check_token_layout(where, features, feats[0].shape[1], checked, level_grids, prefix=int(self.has_cls))
        self._check_text(where, text, feats)
        dtype, acc = feats[0].dtype, accumulation_dtype(feats[0].dtype)
        means = [layer_mean(g, out_dtype=acc) for g in self._group_features(feats)]
        if self.has_cls:
            summaries = torch.stack([m[:, 0] for m in means], dim=1)
            patches = [m[:, 1:] for m in means]
            base = feats[-1][:, 1:]
        else:
            summaries = torch.stack([m.mean(dim=1) for m in means], dim=1)
            patches, base = means, feats[-1]
        weights = self._weights(summaries, text, dtype)
        fused = weights[:, 0, None, None] * patches[0]
        for k in range(1, self.num_groups):
            fused = fused + weights[:, k, None, None] * patches[k]
        return GatedFusion(output=torch.cat([base, fused.to(dtype)], dim=-1), weights=weights)

    def _forward_packed(
        self, where: str, features: Any, grid: object, level_grids: object, text: Tensor | None
    ) -> GatedFusion:
        """A packed batch: the gate reads each image's mean patch token and its own instruction.

        The group means and the weighted sum are token-wise and run on the packed tokens; only the
        summaries are per image (a segment mean over each image's tokens), so image i gets what a
        call on it alone with ``text[i:i+1]`` gives. ``weights`` is (n_images, K).
        """
        check_packed_call(where, features, grid, level_grids)
        self._call_args(where, features, None, text, uses_text=True)
        if self.has_cls:
            raise ValueError(
                f"{where}: has_cls=True reads a CLS token per image, but a packed batch carries patch tokens "
                "only; build the fuser with has_cls=False"
            )
        layers = list(features)
        for i, (t, width) in enumerate(zip(layers, self.in_dims, strict=True)):
            if t.ndim != 2 or t.shape[-1] != width:
                raise ValueError(f"{where}: features[{i}] of a packed batch expected shape (sum N_i, {width}), "
                                 f"got {tuple(t.shape)}")
        grids = list(features.grids)
        num_images = len(grids)
        if self.gate is not None and isinstance(text, Tensor) and tuple(text.shape) != (num_images, self.text_dim):
            raise ValueError(
                f"{where}: text expected shape (n_images, {self.text_dim}) with n_images={num_images}, one "
                f"instruction embedding per image of the packed batch (grids {grids}), got {tuple(text.shape)}"
            )
        self._check_text(where, text, [t.new_empty(num_images, 0) for t in layers[:1]])
        dtype, acc = layers[0].dtype, accumulation_dtype(layers[0].dtype)
        if not grids:
            return GatedFusion(output=layers[0].new_zeros(0, self.out_dim),
                               weights=layers[0].new_zeros(0, self.num_groups, dtype=acc))
        layout = PackedLayout(grids, device=layers[0].device)
        means = [layer_mean(g, out_dtype=acc) for g in self._group_features(layers)]
        sums = torch.stack(means, dim=1).new_zeros(num_images, self.num_groups, self.dim)
        sums = sums.index_add(0, layout.image, torch.stack(means, dim=1))
        summaries = sums / layout.image_sizes.to(acc)[:, None, None]
        weights = self._weights(summaries, text, dtype)
        per_token = weights[layout.image]
        fused = per_token[:, 0, None] * means[0]
        for k in range(1, self.num_groups):
            fused = fused + per_token[:, k, None] * means[k]
        return GatedFusion(output=torch.cat([layers[-1], fused.to(dtype)], dim=-1), weights=weights)

    def forward(
        self,
        features: Sequence[Tensor],
        grid: Sequence[int] | None = None,
        level_grids: Sequence[Sequence[int]] | None = None,
        *,
        text: Tensor | None = None,
    ) -> Tensor:
        """Fuse ``features`` (the hidden states named by [`layers`][layerfuse.fusers.instruction_gated.InstructionGatedFuser.layers]) under instruction ``text``.

        A packed [`LayerFeatures`][layerfuse.LayerFeatures] (per layer (sum N_i, C), per-image
        ``grids``, patch tokens only, so ``has_cls=False``) is fused token-wise with one instruction
        embedding per image: ``text`` (n_images, E); the output is (sum N_i, 2C).

        ``grid`` (H, W) of the patch tokens and ``level_grids`` are not needed; they are accepted when
        they fit the tokens (the calling convention of every fuser, see [`Fuser`][layerfuse.Fuser]).
        """
        return self.forward_with_weights(features, grid, level_grids, text=text).output


def gate_entropy_loss(weights: Tensor) -> Tensor:
    r"""The authors' "balance" regulariser, fixed: minus the mean per-sample entropy of the weights.

    ``loss = -mean_b H(w_b)`` with ``H(w) = -sum_k w_k log w_k``, computed in float32 on the weights
    themselves (the authors' code applies a second softmax to weights that already are one, which pulls
    every distribution toward uniform and shrinks the gradient). Adding ``lambda * loss`` to the training
    loss (the authors use lambda = 0.02) *raises* the entropy: it pushes every sample toward uniform
    weights, against instruction-specific choices; it is not a mixture-of-experts load balance. Off
    unless you add it. Its minimum is ``-log K`` (uniform weights).

    Args:
        weights: (B, K) rows on the simplex, e.g. ``fuser.forward_with_weights(...).weights``.

    Returns:
        A scalar tensor in float32 (float64 for float64 weights).
    """
    if not isinstance(weights, Tensor):
        raise TypeError(f"gate_entropy_loss: weights expected a torch.Tensor (B, K), got {type(weights).__name__}")
    if weights.ndim != 2 or not weights.is_floating_point():
        raise ValueError(
            f"gate_entropy_loss: weights expected a floating-point (B, K) tensor, got shape "
            f"{tuple(weights.shape)} and dtype {weights.dtype}"
        )
    w = weights.to(accumulation_dtype(weights.dtype))
    # xlogy: 0 * log 0 = 0 for a weight that underflowed to zero
    entropy = -torch.special.xlogy(w, w).sum(dim=-1)
    return -entropy.mean()
