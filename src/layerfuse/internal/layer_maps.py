"""Which decoder layer receives which ViT layer: Lin et al.'s proportional map and DeepStack's 0..K-1."""

from __future__ import annotations

from collections.abc import Sequence

from .._checks import check_positive_int

__all__ = ["LIN_INTERNAL_STRATEGIES", "deepstack_layer_map", "lin_layer_map"]

# ViT layers (CLIP-L/14-336 hidden-state indices) whose features Lin et al. inject, per strategy; the
# last entry of the tower's list (L23, the LLM input tokens) is not among them.
LIN_INTERNAL_STRATEGIES: dict[str, tuple[int, ...]] = {
    "18": (18,),
    "3-18": (3, 18),
    "3-18-23": (3, 18, 23),
    "former": tuple(range(1, 13)),
    "latter": tuple(range(13, 25)),
    "all": tuple(range(1, 25)),
}


def lin_layer_map(
    strategy: str | Sequence[int], num_layers: int, *, vit_depth: int = 24
) -> tuple[int, ...]:
    """Lin et al.'s decoder layer for each injected ViT layer (I_D and I_M), as their code computes it.

    For the single-layer strategies and any explicit list of ViT layers k, decoder layer
    ``int(k * num_layers / vit_depth - 1)`` (0-based; ``int`` truncates toward zero, so for
    ``k * N / 24 < 1`` it is layer 0, not -1). The range strategies are fixed ranges in the code:
    ``former`` layers 0..11, ``latter`` the last 12, ``all`` both.

    ```text
    strategy   N = 8        N = 24          N = 32
    18         5            17              23
    3-18       0, 5         2, 17           3, 23
    3-18-23    0, 5, 6      2, 17, 22       3, 23, 29
    former     (too short)  0..11           0..11
    latter     (too short)  12..23          20..31
    all        (too short)  0..23           0..11, 20..31
    ```

    Args:
        strategy: ``"18"``, ``"3-18"``, ``"3-18-23"``, ``"former"``, ``"latter"``, ``"all"``, or a
            sequence of ViT hidden-state indices.
        num_layers: N, the LLM's number of decoder layers.
        vit_depth: the ViT depth the proportional rule divides by (24 in the authors' code, also for
            SigLIP). Default: 24

    Returns:
        The decoder-layer index for each injected level, in level order.

    Raises:
        ValueError: unknown strategy, a range strategy on an LLM with fewer than 12 (``former``,
            ``latter``) or 24 (``all``) layers, or a ViT layer mapped below 0 or past the last layer.

    Examples:
        >>> lin_layer_map("3-18-23", 32)
        (3, 23, 29)
        >>> lin_layer_map([12], 24)
        (11,)
    """
    where = "lin_layer_map"
    check_positive_int(where, "num_layers", num_layers)
    check_positive_int(where, "vit_depth", vit_depth)
    if isinstance(strategy, str):
        if strategy not in LIN_INTERNAL_STRATEGIES:
            raise ValueError(
                f"{where}: strategy expected one of {', '.join(map(repr, LIN_INTERNAL_STRATEGIES))} or a list of ViT "
                f"layers, got {strategy!r}"
            )
        ranges = {"former": 12, "latter": 12, "all": 24}
        if strategy in ranges:
            if num_layers < ranges[strategy]:
                raise ValueError(
                    f"{where}: strategy {strategy!r} fuses {ranges[strategy]} decoder layers, the LLM has {num_layers}"
                )
            first, last = tuple(range(12)), tuple(range(num_layers - 12, num_layers))
            return {"former": first, "latter": last, "all": first + last}[strategy]
        vit_layers: Sequence[int] = LIN_INTERNAL_STRATEGIES[strategy]
    else:
        vit_layers = strategy
        if not vit_layers or any(isinstance(k, bool) or not isinstance(k, int) for k in vit_layers):
            raise TypeError(f"{where}: strategy expected a strategy name or a list of ints, got {strategy!r}")
    mapped = tuple(int(k * num_layers / vit_depth - 1) for k in vit_layers)
    bad = [(k, j) for k, j in zip(vit_layers, mapped) if not 0 <= j < num_layers]
    if bad:
        raise ValueError(
            f"{where}: ViT layers map outside the LLM's {num_layers} decoder layers (0..{num_layers - 1}): "
            + ", ".join(f"{k} -> {j}" for k, j in bad)
        )
    return mapped


def deepstack_layer_map(num_levels: int) -> tuple[int, ...]:
    """DeepStack's map (Qwen3-VL): level i is added after decoder layer i, so layers 0..K-1.

    Examples:
        >>> deepstack_layer_map(3)
        (0, 1, 2)
    """
    check_positive_int("deepstack_layer_map", "num_levels", num_levels)
    return tuple(range(num_levels))
