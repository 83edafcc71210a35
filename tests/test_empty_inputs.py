"""Empty batches (B = 0) and zero queries: every op, layer, fuser and the demo ViT return an empty
result of the right shape, and the backward runs.

Zero queries applies where the queries are independent of a patch grid (ops, layers, the grid-free
fusers); a spatial fuser's queries are its grid's tokens, and a grid cannot be empty (that is a
ValueError, tested with each fuser).
"""

from __future__ import annotations

import pytest
import torch

from layerfuse import (
    ConcatFuser,
    CrossAttentionFuser,
    FusionProjector,
    InstructionGatedFuser,
    MMFuser,
    Projector,
    TokenConcatFuser,
    WeightedSumFuser,
)
from layerfuse.cli.demo_vit import DemoViT
from layerfuse.layers.attention import Attention
from layerfuse.layers.deformable_attention import MultiScaleDeformableAttention
from layerfuse.ops import ms_deform_attn
from layerfuse.ops.attention import attention
from layerfuse.ops.attention.window import windowed_attention

C = 8
GRID = (4, 4)


def _feats(batch, tokens, n, dim=C):
    return [torch.randn(batch, tokens, dim, requires_grad=True) for _ in range(n)]


def _fuser_case(make, num_features, dim=C, **call):
    def run(batch, tokens):
        fuser = make()
        feats = _feats(batch, tokens, num_features, dim)
        return fuser(feats, **call), feats

    return run


def _igva(batch, tokens):
    fuser = InstructionGatedFuser(C, 6, groups=[[0, 1, 2], [3, 4]], base_layer=-2, gate_dim=12, num_blocks=2,
                                  num_heads=3)
    feats = _feats(batch, tokens + 1, len(fuser.layers))  # + CLS
    return fuser(feats, text=torch.randn(batch, fuser.text_dim)), feats


def _msda(batch, queries):
    shapes = [(3, 4), (2, 2)]
    value = torch.randn(batch, 16, 3, 2, requires_grad=True)
    loc = torch.rand(batch, queries, 3, 2, 2, 2, requires_grad=True)
    attn = torch.rand(batch, queries, 3, 2, 2, requires_grad=True)
    return ms_deform_attn(value, shapes, loc, attn), [value, loc, attn]


def _msda_layer(batch, queries):
    layer = MultiScaleDeformableAttention(6, num_levels=1, heads=3)
    query, value = torch.randn(batch, queries, 6, requires_grad=True), torch.randn(batch, 16, 6, requires_grad=True)
    return layer(query, torch.rand(queries, 2), value, [GRID]), [query, value]


def _attention(batch, queries):
    q, kv = torch.randn(batch, 3, queries, 4, requires_grad=True), torch.randn(batch, 3, 5, 4, requires_grad=True)
    return attention(q, kv, kv), [q, kv]


def _cross_attention_layer(batch, queries):
    layer = Attention(C, heads=2)
    x, context = torch.randn(batch, queries, C, requires_grad=True), torch.randn(batch, 5, C, requires_grad=True)
    return layer(x, context), [x, context]


def _windowed(batch, _):
    q, kv = torch.randn(batch, 3, 16, 4, requires_grad=True), torch.randn(batch, 3, 20, 4, requires_grad=True)
    return windowed_attention(q, kv, kv, query_grid=GRID, key_grids=[GRID, (2, 2)], window=2), [q, kv]


def _demo_vit(batch, _):
    images = torch.randn(batch, 3, 32, 32, requires_grad=True)
    return DemoViT(32, 8, 16, depth=2, heads=2)(images), [images]


def _projector(batch, tokens):
    x = torch.randn(batch, tokens, C, requires_grad=True)
    return Projector("mlp2x_gelu", C, 6)(x), [x]


def _fusion_projector(batch, _):
    fuser = MMFuser(C, num_levels=2, heads=2, grid=GRID)
    module = FusionProjector(fuser, Projector("mlp2x_gelu", C, 6), layers=(1, 2, 3), tokens="patch")
    feats = _feats(batch, 16, 3)
    return module(feats), feats


# name: (run(batch, queries) -> (output, inputs), expected shape for (batch, queries), runs with 0 queries)
CASES = {
    "ms_deform_attn": (_msda, lambda b, n: (b, n, 6), True),
    "MultiScaleDeformableAttention": (_msda_layer, lambda b, n: (b, n, 6), True),
    "attention": (_attention, lambda b, n: (b, 3, n, 4), True),
    "Attention": (_cross_attention_layer, lambda b, n: (b, n, C), True),
    "windowed_attention": (_windowed, lambda b, n: (b, 3, 16, 4), False),
    "DemoViT": (_demo_vit, lambda b, n: (b, 17, 16), False),
    "Projector": (_projector, lambda b, n: (b, n, 6), True),
    "ConcatFuser": (_fuser_case(lambda: ConcatFuser([C] * 3, norm=True), 3), lambda b, n: (b, n, 3 * C), True),
    "WeightedSumFuser": (_fuser_case(lambda: WeightedSumFuser(C, 3), 3), lambda b, n: (b, n, C), True),
    "WeightedSumFuser_lln": (
        _fuser_case(lambda: WeightedSumFuser(C, 3, normalize="none", layer_proj=True, layer_proj_dim=5), 3),
        lambda b, n: (b, n, 5), True,
    ),
    "TokenConcatFuser_1d": (_fuser_case(lambda: TokenConcatFuser(C, 3, window=4), 3), lambda b, n: (b, 24, C), False),
    "TokenConcatFuser_2d": (
        _fuser_case(lambda: TokenConcatFuser(C, 3, pool="2d", window=(2, 2), grid=GRID), 3),
        lambda b, n: (b, 24, C), False,
    ),
    "MMFuser": (_fuser_case(lambda: MMFuser(C, num_levels=2, heads=2, grid=GRID), 3), lambda b, n: (b, 16, C), False),
    "MMFuser_odd_heads": (
        _fuser_case(lambda: MMFuser(6, num_levels=2, heads=3, grid=GRID), 3, dim=6), lambda b, n: (b, 16, 6), False,
    ),
    "CrossAttentionFuser": (
        _fuser_case(lambda: CrossAttentionFuser(C, num_levels=2, heads=2, grid=GRID), 3), lambda b, n: (b, 16, C), False,
    ),
    "CrossAttentionFuser_windowed": (
        _fuser_case(lambda: CrossAttentionFuser(C, num_levels=2, heads=2, grid=GRID, window=3, self_attn=True), 3),
        lambda b, n: (b, 16, C), False,
    ),
    "InstructionGatedFuser": (_igva, lambda b, n: (b, n, 2 * C), False),
    "FusionProjector": (_fusion_projector, lambda b, n: (b, 16, 6), False),
}


PARAMS = [pytest.param(name, 0, 16, id=f"{name}-empty_batch") for name in CASES] + [
    pytest.param(name, 2, 0, id=f"{name}-zero_queries") for name, (_, _, zero_queries) in CASES.items() if zero_queries
]


@pytest.mark.parametrize(("name", "batch", "queries"), PARAMS)
def test_empty_inputs_give_empty_results(name, batch, queries):
    run, shape, _ = CASES[name]
    torch.manual_seed(0)
    out, inputs = run(batch, queries)
    assert tuple(out.shape) == shape(batch, queries)
    assert out.numel() == 0
    out.sum().backward()
    for t in inputs:
        assert t.grad is not None
        assert t.grad.shape == t.shape
