"""windowed_attention(): equals full attention under the explicit window mask; window placement."""

from __future__ import annotations

import pytest
import torch

from layerfuse.ops.attention import attention, packed_windowed_attention, window_mask, windowed_attention
from layerfuse.ops.attention.window import window_starts


def brute_force_mask(query_grid, key_grids, windows):
    """Per query and level: the w consecutive tokens per axis whose middle is nearest the query's
    centre mapped onto the level (ties to the later start), kept inside the grid."""

    def axis(nq, nk, w, i):
        centre = (i + 0.5) * nk / nq
        best = min(range(nk - w + 1), key=lambda s: (abs(s + w / 2 - centre), -s))
        return set(range(best, best + w))

    rows = []
    for i in range(query_grid[0]):
        for j in range(query_grid[1]):
            row = []
            for (h, wd), w in zip(key_grids, windows):
                r, c = axis(query_grid[0], h, w, i), axis(query_grid[1], wd, w, j)
                row += [(y in r) and (x in c) for y in range(h) for x in range(wd)]
            rows.append(row)
    return torch.tensor(rows)


CONFIGS = [
    # query grid, key grids, window(s), tile
    ((5, 7), [(5, 7), (5, 7)], 3, None),
    ((5, 7), [(5, 7), (10, 14)], [3, 2], 2),
    ((6, 4), [(12, 8), (3, 2), (7, 5)], [2, 1, 3], 3),
    ((3, 3), [(9, 9)], 3, 2),
    ((1, 6), [(2, 5)], 2, None),
    ((4, 4), [(4, 4)], 4, 3),
]


@pytest.mark.parametrize(("query_grid", "key_grids", "window", "tile"), CONFIGS)
def test_window_mask_matches_definition(query_grid, key_grids, window, tile):
    windows = window if isinstance(window, list) else [window] * len(key_grids)
    assert torch.equal(window_mask(query_grid, key_grids, window), brute_force_mask(query_grid, key_grids, windows))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(("query_grid", "key_grids", "window", "tile"), CONFIGS)
def test_windowed_equals_full_attention_with_explicit_mask(query_grid, key_grids, window, tile, batch):
    g = torch.Generator().manual_seed(0)
    nq, m = query_grid[0] * query_grid[1], sum(h * w for h, w in key_grids)
    q, k, v = (torch.randn(batch, 2, n, d, generator=g, dtype=torch.float64, requires_grad=True)
               for n, d in ((nq, 4), (m, 4), (m, 5)))
    out = windowed_attention(q, k, v, query_grid=query_grid, key_grids=key_grids, window=window, tile=tile)
    ref = attention(q, k, v, mask=window_mask(query_grid, key_grids, window), backend="eager")
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_tile_never_changes_the_result():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 35, 8, generator=g), torch.randn(2, 2, 2 * 35, 8, generator=g)
    outs = [windowed_attention(q, k, k, query_grid=(5, 7), key_grids=[(5, 7)] * 2, window=3, tile=t) for t in (1, 2, 5, 16)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0])


def test_window_one_on_equal_grids_sees_exactly_the_colocated_token_of_each_level():
    mask = window_mask((4, 6), [(4, 6)] * 3, 1)
    assert torch.equal(mask.sum(-1), torch.full((24,), 3))
    assert torch.equal(mask, torch.eye(24, dtype=torch.bool).repeat(1, 3))


def test_window_equal_to_grid_ratio_gives_disjoint_cambrian_cells():
    # level grid 3x the query grid and window 3: query (i, j) sees exactly the 3x3 cell below it
    mask = window_mask((2, 3), [(6, 9)], 3).view(2, 3, 6, 9)
    for i in range(2):
        for j in range(3):
            expected = torch.zeros(6, 9, dtype=torch.bool)
            expected[3 * i:3 * i + 3, 3 * j:3 * j + 3] = True
            assert torch.equal(mask[i, j], expected)
    assert window_starts(2, 6, 3) == (0, 3)


def test_windows_shift_inward_at_borders():
    assert window_starts(6, 6, 3) == (0, 0, 1, 2, 3, 3)
    assert window_starts(5, 5, 2) == (0, 1, 2, 3, 3)


def test_cached_plan_built_in_inference_mode_still_supports_backward():
    q, k = torch.randn(1, 2, 12, 4), torch.randn(1, 2, 12, 4)
    with torch.inference_mode():
        windowed_attention(q, k, k, query_grid=(3, 4), key_grids=[(3, 4)], window=2, tile=2)
    q.requires_grad_()
    windowed_attention(q, k, k, query_grid=(3, 4), key_grids=[(3, 4)], window=2, tile=2).sum().backward()
    assert q.grad is not None
    assert torch.isfinite(q.grad).all()


def test_bfloat16_close_to_float32():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 20, 8, generator=g), torch.randn(1, 2, 40, 8, generator=g)
    kwargs = {"query_grid": (4, 5), "key_grids": [(4, 5), (4, 5)], "window": 3}
    out = windowed_attention(q.bfloat16(), k.bfloat16(), k.bfloat16(), **kwargs)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), windowed_attention(q, k, k, **kwargs), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"window": 5}, ValueError, r"window 5 does not fit key level 0 with grid \(4, 5\); use a window <= 4"),
        ({"window": [3]}, ValueError, r"window expected one int per key level \(2\), got \[3\]"),
        ({"window": 0}, ValueError, "window expected a positive int, got 0"),
        ({"window": 2.0}, TypeError, "window expected a positive int"),
        ({"query_grid": (4, 4)}, ValueError, r"query_grid \(4, 4\) has 16 tokens but q has 20"),
        ({"key_grids": [(4, 5), (4, 4)]}, ValueError, r"cover 36 tokens but k has 40"),
        ({"key_grids": []}, TypeError, "key_grids expected a non-empty sequence"),
        ({"tile": 0}, ValueError, "tile expected a positive int"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, message):
    q, k = torch.randn(1, 2, 20, 8), torch.randn(1, 2, 40, 8)
    args = {"query_grid": (4, 5), "key_grids": [(4, 5), (5, 4)], "window": 3, **kwargs}
    with pytest.raises(error, match=message):
        windowed_attention(q, k, k, **args)


def test_packed_windowed_attention_equals_one_call_per_image():
    g = torch.Generator().manual_seed(0)
    grids = [(5, 7), (3, 3), (8, 4)]
    levels = 2
    q_parts = [torch.randn(2, 3, h * w, 8, generator=g, dtype=torch.float64) for h, w in grids]
    k_parts = [torch.randn(2, 3, levels * h * w, 8, generator=g, dtype=torch.float64) for h, w in grids]
    v_parts = [torch.randn(2, 3, levels * h * w, 8, generator=g, dtype=torch.float64) for h, w in grids]
    q, k, v = (torch.cat(parts, dim=2).requires_grad_() for parts in (q_parts, k_parts, v_parts))
    out = packed_windowed_attention(q, k, v, query_grids=grids, key_grids=[[gr] * levels for gr in grids],
                                    window=[3, 2])
    qs, ks, vs = (t.split(sizes, dim=2) for t, sizes in (
        (q, [h * w for h, w in grids]), (k, [levels * h * w for h, w in grids]), (v, [levels * h * w for h, w in grids])))
    expected = torch.cat([
        windowed_attention(qi, ki, vi, query_grid=gr, key_grids=[gr] * levels, window=[3, 2])
        for qi, ki, vi, gr in zip(qs, ks, vs, grids)
    ], dim=2)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    weight = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * weight).sum(), (q, k, v))
    for a, b in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_packed_windowed_attention_checks_its_grids():
    q = torch.randn(1, 2, 4 + 9, 8)
    with pytest.raises(ValueError, match=r"the grids cover 13 query and 26 key tokens but q has 13 and k 20"):
        packed_windowed_attention(q, q[:, :, :10].repeat(1, 1, 2, 1), q[:, :, :10].repeat(1, 1, 2, 1),
                                  query_grids=[(2, 2), (3, 3)], key_grids=[[(2, 2)] * 2, [(3, 3)] * 2], window=2)
    with pytest.raises(ValueError, match=r"every image needs the same number of key levels, got \[1, 2\]"):
        packed_windowed_attention(q, q, q, query_grids=[(2, 2), (3, 3)], key_grids=[[(2, 2)], [(3, 3)] * 2],
                                  window=2)
    with pytest.raises(ValueError, match=r"window 3 does not fit key level 0 with grid \(2, 2\)"):
        packed_windowed_attention(q, q, q, query_grids=[(2, 2), (3, 3)], key_grids=[[(2, 2)], [(3, 3)]], window=3)
