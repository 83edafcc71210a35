"""What the deep-query fusers share: one query layer among several key/value levels, on grids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, NamedTuple

from torch import Tensor

from .._checks import (
    check_feature_list,
    check_grid,
    check_positive_int,
    check_widths,
    resolve_grid,
    resolve_level_grids,
)
from .base import Fuser

__all__ = ["DeepQueryFuser", "DeepQueryInputs"]


class DeepQueryInputs(NamedTuple):
    """``features`` split into the query and its key/value levels, with their grids.

    ``query_grid`` and ``level_grids`` are ``None`` when the caller did not ask for the layout.
    """

    query: Tensor
    levels: list[Tensor]
    query_grid: tuple[int, int] | None
    level_grids: list[tuple[int, int]] | None


class DeepQueryFuser(Fuser):
    """Base of the fusers in which a deep query layer attends to ``num_levels`` other layers.

    ``features`` holds ``num_levels + 1`` tensors of width ``dim``: the key/value levels in order with
    the query at ``query_index`` (by default last, as the MMFuser authors order them). Subclasses call
    `_init_layout` first in ``__init__`` and `_split` first in ``forward``.
    """

    dim: Final[int]
    num_levels: Final[int]
    heads: Final[int]
    query_index: Final[int]
    grid: tuple[int, int] | None

    def _init_layout(
        self, where: str, dim: int, num_levels: int, heads: int, query_index: int, grid: Sequence[int] | None
    ) -> None:
        check_positive_int(where, "dim", dim)
        check_positive_int(where, "num_levels", num_levels)
        check_positive_int(where, "heads", heads)
        if dim % heads:
            raise ValueError(f"{where}: dim={dim} expected a multiple of heads={heads}")
        if isinstance(query_index, bool) or not isinstance(query_index, int):
            raise TypeError(f"{where}: query_index expected an int, got {type(query_index).__name__}")
        if not -(num_levels + 1) <= query_index <= num_levels:
            raise ValueError(
                f"{where}: query_index expected a position among the {num_levels + 1} inputs "
                f"(-{num_levels + 1} .. {num_levels}), got {query_index}"
            )
        self.dim, self.num_levels, self.heads, self.query_index = dim, num_levels, heads, query_index
        self.grid = None if grid is None else check_grid(where, grid)
        self.in_dims = (dim,) * (num_levels + 1)
        self.out_dim = dim
        self._query_pos = query_index % (num_levels + 1)

    def _split(
        self,
        where: str,
        features: Sequence[Tensor],
        grid: Sequence[int] | None,
        level_grids: Sequence[Sequence[int]] | None,
        *,
        spatial: bool = True,
    ) -> DeepQueryInputs:
        """Validate ``features`` and split them; with ``spatial`` also resolve every grid
        (explicit ``grid`` / ``level_grids`` > ``features.grid`` from the tap > the module's ``grid``)."""
        feats = check_feature_list(where, features, length=self.num_inputs)
        check_widths(where, feats, self.in_dims)
        query = feats[self._query_pos]
        levels = [(i, f) for i, f in enumerate(feats) if i != self._query_pos]
        query_grid = shapes = None
        if spatial:
            query_grid = resolve_grid(
                f"{where}: features[{self._query_pos}] (query)", query.shape[1], grid, features, self.grid
            )
            shapes = resolve_level_grids(where, levels, grid, level_grids, features, self.grid)
        return DeepQueryInputs(query, [f for _, f in levels], query_grid, shapes)
