"""Lin et al.'s ``--layer_using_strategy`` layer lists, shared by the E_D and E_M converters."""

from __future__ import annotations

from .._checks import check_choice

__all__ = ["LIN_SELECTED_LAYERS", "LIN_TOWERS", "lin_selected_layers"]

# The list the authors' tower returns for each strategy, as hidden-state indices (0 = embedding
# output, k = block k). The last entry is always the "final" layer (the query of E_M, the last channel
# block of E_D). The SigLIP lists are for the truncated 26-block tower (27 hidden states); the authors
# wired only "3-18-23" and "latter" for it.
LIN_SELECTED_LAYERS: dict[str, dict[str, tuple[int, ...]]] = {
    "clip": {
        "18": (18, 23),
        "3-18": (3, 18, 23),
        "3-18-23": (3, 18, 23, 23),
        "former": (*range(1, 13), 23),
        "latter": (*range(13, 25), 23),
        "all": (*range(1, 25), 23),
    },
    "siglip": {
        "3-18-23": (3, 20, 25, 25),
        "latter": (*range(15, 27), 25),
    },
}
LIN_TOWERS = tuple(LIN_SELECTED_LAYERS)


def lin_selected_layers(strategy: str, tower: str, *, where: str, paradigm: str) -> tuple[int, ...]:
    """The authors' selected hidden-state list for ``strategy`` on ``tower`` (``"clip"`` or ``"siglip"``).

    ``paradigm`` (``"E_D"`` or ``"E_M"``) only words the error for ``"3-18"``, for which the authors'
    builder makes no external projector at all.
    """
    if strategy == "3-18":
        raise ValueError(
            f"{where}: strategy='3-18' builds no {paradigm} projector in the authors' code (their builder "
            "returns None); '3-18-23' is the same external model, use strategy='3-18-23'"
        )
    check_choice(where, "tower", tower, LIN_TOWERS)
    check_choice(where, "strategy", strategy, tuple(LIN_SELECTED_LAYERS[tower]))
    return LIN_SELECTED_LAYERS[tower][strategy]
