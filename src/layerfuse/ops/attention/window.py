"""Local-window attention: each query attends to a window of each key level, in linear memory.

Window placement. A query grid (Hq, Wq) is laid over each key level's grid (H, W) so both cover the
same image. Along each axis, query index i has its centre at ``(i + 0.5) · H / Hq`` in key-token
units, and its window is the ``w`` consecutive key tokens whose middle is nearest that centre (ties
go to the later start), shifted inward at the borders so every query sees exactly ``w × w`` tokens of
every level. With equal grids and odd ``w`` this is the usual centred ``w × w`` neighbourhood; with
``H = r · Hq`` and ``w = r`` the windows are the disjoint r × r cells of Cambrian's SVA.

Computation. Queries are cut into tiles; every tile gathers the union of its queries' windows (its
"halo") from every level and runs one dense attention call with a mask that keeps each query inside
its own window. Memory and work grow linearly with the number of tokens, the result equals full
attention under [`window_mask`][layerfuse.ops.attention.window_mask], and it runs on the same backends as
[`attention`][layerfuse.ops.attention.attention] (no compilation needed).
"""

# b batch, h heads, d head dim, th/tw tiles along rows/cols (t = th·tw), a/c query rows/cols inside a
# tile, p/s key rows/cols inside a tile's halo, n tokens of a tile

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor

from ..._checks import check_grid, check_positive_int
from .dispatch import AttentionInputs, apply_backend, select_backend

__all__ = [
    "default_tile",
    "packed_windowed_attention",
    "resolve_windows",
    "window_mask",
    "window_starts",
    "windowed_attention",
]

_WHERE = "windowed_attention"


def default_tile(windows: Sequence[int]) -> int:
    """Largest query tile side used when none is given.

    A tile of t queries per side gathers t + w - 1 keys per side and level: small tiles copy each key
    into many tiles, large ones spend attention work on masked keys. A side of about w + 1 (at least
    8) was fastest on the CPU for 24x24 to 64x64 grids with w = 3 and 7
    (``benchmarks/cross_attention_scaling.py``).
    """
    return max(8, max(windows) + 1)


def window_starts(num_queries: int, num_keys: int, window: int) -> tuple[int, ...]:
    """First key index of the window of each query index along one axis (see the module docstring)."""
    return tuple(
        min(max(((2 * i + 1) * num_keys - (window - 1) * num_queries) // (2 * num_queries), 0), num_keys - window)
        for i in range(num_queries)
    )


def resolve_windows(where: str, window: int | Sequence[int], key_grids: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    """One window side per key level, each fitting inside its level's grid."""
    if isinstance(window, Sequence) and not isinstance(window, str):
        if len(window) != len(key_grids):
            raise ValueError(
                f"{where}: window expected one int per key level ({len(key_grids)}), got {list(window)}"
            )
        windows = tuple(check_positive_int(where, f"window[{i}]", w) for i, w in enumerate(window))
    else:
        windows = (check_positive_int(where, "window", window),) * len(key_grids)
    for i, (w, (h, wd)) in enumerate(zip(windows, key_grids)):
        if w > min(h, wd):
            raise ValueError(
                f"{where}: window {w} does not fit key level {i} with grid {(h, wd)}; "
                f"use a window <= {min(h, wd)} or full attention (window=None)"
            )
    return windows


def _check_grids(
    where: str, query_grid: Sequence[int], key_grids: Sequence[Sequence[int]]
) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    qgrid = check_grid(where, query_grid, name="query_grid")
    if isinstance(key_grids, Tensor) or not isinstance(key_grids, Sequence) or len(key_grids) == 0:
        raise TypeError(f"{where}: key_grids expected a non-empty sequence of (H, W) pairs, got {key_grids!r}")
    kgrids = [check_grid(where, g, name=f"key_grids[{i}]") for i, g in enumerate(key_grids)]
    return qgrid, kgrids


def window_mask(
    query_grid: Sequence[int],
    key_grids: Sequence[Sequence[int]],
    window: int | Sequence[int],
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """The bool (Hq·Wq, sum of H·W) mask, True inside each query's window, levels concatenated in order.

    ``attention(q, k, v, mask=window_mask(...))`` equals [`windowed_attention`][layerfuse.ops.attention.windowed_attention], at a memory cost
    of Nq × Nk; it exists to define and test the windowed path.
    """
    qgrid, kgrids = _check_grids("window_mask", query_grid, key_grids)
    windows = resolve_windows("window_mask", window, kgrids)
    parts = []
    for w, (h, wd) in zip(windows, kgrids):
        axes = []
        for nq, nk in ((qgrid[0], h), (qgrid[1], wd)):
            starts = torch.tensor(window_starts(nq, nk, w), device=device)[:, None]
            keys = torch.arange(nk, device=device)
            axes.append((keys >= starts) & (keys < starts + w))
        rows, cols = axes
        parts.append(rearrange(rows[:, None, :, None] & cols[None, :, None, :], "gh gw p s -> (gh gw) (p s)"))
    return torch.cat(parts, dim=-1)


def _axis_plan(num_queries: int, num_keys: int, window: int, tile: int) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """Window starts of every padded query index, halo start of every tile, and the halo length."""
    num_tiles = -(-num_queries // tile)
    exact = window_starts(num_queries, num_keys, window)
    # Padding queries past the grid reuse the last query's window: always a valid, non-empty window.
    starts = tuple(exact[min(i, num_queries - 1)] for i in range(num_tiles * tile))
    spread = max(starts[t * tile + tile - 1] - starts[t * tile] for t in range(num_tiles))
    halo = min(spread + window, num_keys)
    halo_starts = tuple(min(starts[t * tile], num_keys - halo) for t in range(num_tiles))
    return starts, halo_starts, halo


def _axis_index(
    num_queries: int, num_keys: int, window: int, tile: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Key indices of each tile's halo (tiles, halo) and the in-window test (tiles, tile, halo)."""
    starts, halo_starts, halo = _axis_plan(num_queries, num_keys, window, tile)
    keys = torch.tensor(halo_starts, device=device)[:, None] + torch.arange(halo, device=device)
    first = torch.tensor(starts, device=device).view(-1, tile, 1)
    inside = (keys[:, None, :] >= first) & (keys[:, None, :] < first + window)
    return keys, inside


@functools.lru_cache(maxsize=32)
def _tile_plan(
    query_grid: tuple[int, int],
    key_grids: tuple[tuple[int, int], ...],
    windows: tuple[int, ...],
    tile: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Token indices that cut queries and keys into tiles, the tiles' mask and the way back.

    Returns ``query_index`` (T·tile_h·tile_w,) into the query tokens (padding repeats the last
    row/column), ``key_index`` (T·K,) into the concatenated key tokens, ``mask`` (T, tile_h·tile_w, K),
    additive (0 inside a query's windows, -inf outside) in ``dtype`` as the fused kernels take it, and
    ``output_index`` (Hq·Wq,) locating each query token in the tiled output.

    Cached per shape (a few MiB at most): building the mask costs about as much as the gathers, and
    a training loop sees the same shapes every step. Built outside inference mode so the cached
    tensors can be saved for backward by later calls.
    """
    with torch.inference_mode(False):
        return _build_tile_plan(query_grid, key_grids, windows, tile, device, dtype)


def _build_tile_plan(
    query_grid: tuple[int, int],
    key_grids: tuple[tuple[int, int], ...],
    windows: tuple[int, ...],
    tile: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gh, gw = query_grid
    # As few tiles as the largest side allows, evened out so little padding is computed.
    n_th, n_tw = -(-gh // tile), -(-gw // tile)
    tile_h, tile_w = -(-gh // n_th), -(-gw // n_tw)
    rows = torch.arange(n_th * tile_h, device=device).clamp(max=gh - 1)
    cols = torch.arange(n_tw * tile_w, device=device).clamp(max=gw - 1)
    query_index = rearrange(
        rows[:, None] * gw + cols[None, :], "(th a) (tw c) -> (th tw a c)", a=tile_h, c=tile_w
    )
    i, j = torch.arange(gh, device=device)[:, None], torch.arange(gw, device=device)[None, :]
    output_index = (((i // tile_h) * n_tw + j // tile_w) * tile_h + i % tile_h) * tile_w + j % tile_w
    key_index, masks, offset = [], [], 0
    for w, (h, wd) in zip(windows, key_grids):
        row_keys, row_inside = _axis_index(gh, h, w, tile_h, device)
        col_keys, col_inside = _axis_index(gw, wd, w, tile_w, device)
        flat = offset + row_keys[:, None, :, None] * wd + col_keys[None, :, None, :]
        key_index.append(rearrange(flat, "th tw p s -> (th tw) (p s)"))
        inside = row_inside[:, None, :, None, :, None] & col_inside[None, :, None, :, None, :]
        masks.append(rearrange(inside, "th tw a c p s -> (th tw) (a c) (p s)"))
        offset += h * wd
    inside = torch.cat(masks, dim=-1)
    mask = torch.zeros(inside.shape, device=device, dtype=dtype).masked_fill_(~inside, float("-inf"))
    return query_index, torch.cat(key_index, dim=1).flatten(), mask, output_index.flatten()


def windowed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    query_grid: Sequence[int],
    key_grids: Sequence[Sequence[int]],
    window: int | Sequence[int],
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str = "auto",
    tile: int | None = None,
) -> Tensor:
    """Attention where each query sees only its local window of every key level.

    Args:
        q: (B, H, Hq·Wq, D) queries, row-major over ``query_grid``.
        k: (B, H, M, D) keys of all levels concatenated in order, each row-major over its grid;
            M = sum of H_l·W_l.
        v: (B, H, M, Dv) values, laid out like ``k``.
        query_grid: (Hq, Wq).
        key_grids: (H_l, W_l) of each key level.
        window: window side in key tokens, one int for every level or one per level; at most the
            level's shorter side.
        dropout_p: attention dropout probability (applied whenever > 0).
        scale: factor on q·kᵀ. Default: ``D ** -0.5``.
        backend: attention backend, as in [`attention`][layerfuse.ops.attention.attention].
        tile: largest query tile side (tiles are evened out over the grid); changes speed and
            memory only, never the result. Default: `default_tile`.

    Returns:
        (B, H, Hq·Wq, Dv), equal to ``attention(q, k, v, mask=window_mask(query_grid, key_grids,
        window))``.
    """
    AttentionInputs(q, k, v, None, dropout_p, scale).validate()
    (gh, gw), kgrids = _check_grids(_WHERE, query_grid, key_grids)
    windows = resolve_windows(_WHERE, window, kgrids)
    tile = default_tile(windows) if tile is None else check_positive_int(_WHERE, "tile", tile)
    if q.shape[2] != gh * gw:
        raise ValueError(f"{_WHERE}: query_grid {(gh, gw)} has {gh * gw} tokens but q has {q.shape[2]} (q={tuple(q.shape)})")
    sizes = [h * w for h, w in kgrids]
    if k.shape[2] != sum(sizes):
        raise ValueError(
            f"{_WHERE}: key_grids {kgrids} cover {sum(sizes)} tokens but k has {k.shape[2]} (k={tuple(k.shape)})"
        )
    b = q.shape[0]
    # Under torch.compile the plan is traced into the graph (constant-folded) instead of cached.
    plan = _build_tile_plan if torch.compiler.is_compiling() else _tile_plan
    query_index, key_index, mask, output_index = plan((gh, gw), tuple(kgrids), windows, tile, q.device, q.dtype)
    num_tiles = mask.shape[0]
    # Tiles go on the batch axis and (batch, heads) on the heads axis, so the (T, 1, n, K) mask
    # broadcasts instead of being repeated per image. The gathers read the (N, B, H, D) view of the
    # projections' memory, so each tiled tensor costs one copy and the rest are views.
    q_tiles, k_tiles, v_tiles = (
        rearrange(t.permute(2, 0, 1, 3).index_select(0, index), "(t n) b h d -> t (b h) n d", t=num_tiles)
        for t, index in ((q, query_index), (k, key_index), (v, key_index))
    )
    tiled = AttentionInputs(q_tiles, k_tiles, v_tiles, mask[:, None], dropout_p, scale)
    # Every window holds at least one token, so the fully-masked-row handling of attention() is not
    # needed; the backend runs directly.
    out = apply_backend(select_backend(tiled, backend), tiled)
    # Both b and h named: with B = 0 einops could not infer h from (b h) = 0.
    out = rearrange(out, "t (b h) n d -> b (t n) h d", b=b, h=q.shape[1])
    return out.index_select(1, output_index).transpose(1, 2)


@functools.lru_cache(maxsize=32)
def _packed_tile_plan(
    query_grids: tuple[tuple[int, int], ...],
    key_grids: tuple[tuple[tuple[int, int], ...], ...],
    windows: tuple[int, ...],
    tile: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The tiles of every image of a packed batch, padded to one tile size and concatenated.

    Each image is cut into tiles exactly as [`windowed_attention`][layerfuse.ops.attention.windowed_attention]
    cuts it alone; tiles are then padded to the largest tile (n queries) and halo (K keys) of the
    batch. Padded keys are masked out (-inf) and padded query rows see the tile's real keys (finite,
    and dropped from the output), so each tile attends exactly as it does in a call on its image.
    Same returns as ``_tile_plan``, indices into the packed query and key tokens.
    """
    with torch.inference_mode(False):
        plans = {}
        for grids in zip(query_grids, key_grids):
            if grids not in plans:
                plans[grids] = _build_tile_plan(grids[0], grids[1], windows, tile, device, dtype)
        n_max = max(plan[2].shape[1] for plan in plans.values())
        k_max = max(plan[2].shape[2] for plan in plans.values())
        query_index, key_index, masks, output_index = [], [], [], []
        q_start = k_start = first_tile = 0
        for grids in zip(query_grids, key_grids):
            qi, ki, mi, oi = plans[grids]
            t, n, k = mi.shape
            q = torch.full((t, n_max), q_start, device=device, dtype=qi.dtype)
            q[:, :n] = qi.view(t, n) + q_start
            keys = torch.full((t, k_max), k_start, device=device, dtype=ki.dtype)
            keys[:, :k] = ki.view(t, k) + k_start
            mask = torch.full((t, n_max, k_max), float("-inf"), device=device, dtype=dtype)
            mask[:, :n, :k] = mi
            mask[:, n:, :k] = 0.0
            query_index.append(q.flatten())
            key_index.append(keys.flatten())
            masks.append(mask)
            output_index.append((first_tile + oi // n) * n_max + oi % n)
            (gh, gw), kgrids = grids
            q_start += gh * gw
            k_start += sum(h * w for h, w in kgrids)
            first_tile += t
        return torch.cat(query_index), torch.cat(key_index), torch.cat(masks), torch.cat(output_index)


def packed_windowed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    query_grids: Sequence[Sequence[int]],
    key_grids: Sequence[Sequence[Sequence[int]]],
    window: int | Sequence[int],
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str = "auto",
    tile: int | None = None,
) -> Tensor:
    """[`windowed_attention`][layerfuse.ops.attention.windowed_attention] over a packed batch of images in one call.

    Image i has Hq_i·Wq_i query tokens and its key levels; its queries attend only to its own keys,
    each in its window placed on image i's grids. The tiles of all images go into one batch of tiles
    (each image tiled within itself, padded to the largest tile and masked), so the result equals one
    ``windowed_attention`` call per image, concatenated, from a single kernel call.

    Args:
        q: (B, H, sum Hq_i·Wq_i, D) queries, image after image, each row-major over its grid.
        k: (B, H, M, D) keys, image after image, each image's levels concatenated in order and each
            row-major over its grid; M = sum over images and levels of H_il·W_il.
        v: (B, H, M, Dv) values, laid out like ``k``.
        query_grids: (Hq_i, Wq_i) of each image.
        key_grids: per image, the (H_il, W_il) of each of its key levels (the same number of levels
            for every image).
        window: window side in key tokens, one int or one per level; at most every level's shorter
            side.
        dropout_p: attention dropout probability (applied whenever > 0).
        scale: factor on q·kᵀ. Default: ``D ** -0.5``.
        backend: attention backend, as in [`attention`][layerfuse.ops.attention.attention].
        tile: largest query tile side; changes speed and memory only. Default: `default_tile`.

    Returns:
        (B, H, sum Hq_i·Wq_i, Dv).

    Raises:
        ValueError: grids that do not fit the token counts, a different number of key levels per
            image, or a window larger than a level.

    Examples:
        >>> q = torch.randn(1, 2, 4 * 6 + 3 * 3, 8)
        >>> kv = torch.randn(1, 2, 2 * (4 * 6) + 2 * (3 * 3), 8)
        >>> packed_windowed_attention(q, kv, kv, query_grids=[(4, 6), (3, 3)],
        ...     key_grids=[[(4, 6)] * 2, [(3, 3)] * 2], window=3).shape
        torch.Size([1, 2, 33, 8])
    """
    AttentionInputs(q, k, v, None, dropout_p, scale).validate()
    if isinstance(query_grids, Tensor) or not isinstance(query_grids, Sequence) or len(query_grids) == 0:
        raise TypeError(f"packed_windowed_attention: query_grids expected a non-empty sequence of (H, W) pairs, "
                        f"got {query_grids!r}")
    if isinstance(key_grids, Tensor) or not isinstance(key_grids, Sequence) or len(key_grids) != len(query_grids):
        raise ValueError(f"packed_windowed_attention: key_grids expected one list of level grids per image "
                         f"({len(query_grids)}), got {key_grids!r}")
    checked = [_check_grids("packed_windowed_attention", qg, kg) for qg, kg in zip(query_grids, key_grids)]
    levels = {len(kg) for _, kg in checked}
    if len(levels) != 1:
        raise ValueError(f"packed_windowed_attention: every image needs the same number of key levels, got "
                         f"{[len(kg) for _, kg in checked]}")
    windows = {resolve_windows("packed_windowed_attention", window, kg) for _, kg in checked}.pop()
    tile = default_tile(windows) if tile is None else check_positive_int("packed_windowed_attention", "tile", tile)
    num_queries = sum(h * w for (h, w), _ in checked)
    num_keys = sum(h * w for _, kg in checked for h, w in kg)
    if q.shape[2] != num_queries or k.shape[2] != num_keys:
        raise ValueError(
            f"packed_windowed_attention: the grids cover {num_queries} query and {num_keys} key tokens but "
            f"q has {q.shape[2]} and k {k.shape[2]} (q={tuple(q.shape)}, k={tuple(k.shape)})"
        )
    b = q.shape[0]
    qgrids = tuple(g for g, _ in checked)
    kgrids = tuple(tuple(kg) for _, kg in checked)
    plan = _packed_tile_plan.__wrapped__ if torch.compiler.is_compiling() else _packed_tile_plan
    query_index, key_index, mask, output_index = plan(qgrids, kgrids, windows, tile, q.device, q.dtype)
    num_tiles = mask.shape[0]
    q_tiles, k_tiles, v_tiles = (
        rearrange(t.permute(2, 0, 1, 3).index_select(0, index), "(t n) b h d -> t (b h) n d", t=num_tiles)
        for t, index in ((q, query_index), (k, key_index), (v, key_index))
    )
    tiled = AttentionInputs(q_tiles, k_tiles, v_tiles, mask[:, None], dropout_p, scale)
    out = apply_backend(select_backend(tiled, backend), tiled)
    out = rearrange(out, "t (b h) n d -> b (t n) h d", b=b, h=q.shape[1])
    return out.index_select(1, output_index).transpose(1, 2)
