"""One calling convention: every fuser family (and the fuser + projector pipeline) runs in the same calling
code, takes `grid`, `level_grids` and `text`, uses what it needs and checks the rest."""

import pytest
import torch

from layerfuse import (
    ConcatFuser,
    CrossAttentionFuser,
    FusionProjector,
    InstructionGatedFuser,
    LayerFeatures,
    MMFuser,
    Projector,
    TokenConcatFuser,
    WeightedSumFuser,
)

C, GRID, N_IN, TEXT_DIM = 8, (3, 4), 5, 6
LAYERS = (1, 2, 3, 4, 10)  # IGVA below: groups [1, 2] and [3, 4], base layer 10


def _perturbed(fuser):
    # zero layer-scales make the attention fusers the identity; random values make the grid matter
    with torch.no_grad():
        for p in fuser.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return fuser


FUSERS = {
    "concat": lambda: ConcatFuser([C] * N_IN, terms=[4, [0, 1], [2, 3]], dtype=torch.float64),
    "weighted_sum": lambda: WeightedSumFuser(C, N_IN, normalize="none", layer_proj=True, dtype=torch.float64),
    "token_concat_1d": lambda: TokenConcatFuser(C, N_IN, window=4, dtype=torch.float64),
    "token_concat_2d": lambda: TokenConcatFuser(C, N_IN, pool="2d", window=2, dtype=torch.float64),
    "mmfuser": lambda: MMFuser(C, num_levels=N_IN - 1, heads=2, points=2, dtype=torch.float64),
    "cross_attention": lambda: CrossAttentionFuser(C, num_levels=N_IN - 1, heads=2, dtype=torch.float64),
    "cross_attention_windowed": lambda: CrossAttentionFuser(C, N_IN - 1, 2, window=2, dtype=torch.float64),
    "instruction_gated": lambda: InstructionGatedFuser(
        C, TEXT_DIM, groups=[[1, 2], [3, 4]], base_layer=10, gate_dim=8, num_blocks=1, num_heads=2,
        has_cls=False, dtype=torch.float64,
    ),
    "instruction_gated_stage1": lambda: InstructionGatedFuser(
        C, TEXT_DIM, groups=[[1, 2], [3, 4]], base_layer=10, has_cls=False, gated=False, dtype=torch.float64
    ),
}


def _build(name, pipeline):
    fuser = _perturbed(FUSERS[name]())
    if not pipeline:
        return fuser
    projector = Projector("mlp2x_gelu", fuser.out_dim, 6, dtype=torch.float64)
    return FusionProjector(fuser, projector, layers=LAYERS)


def _tapped():
    torch.manual_seed(0)
    tensors = [torch.randn(2, GRID[0] * GRID[1], C, dtype=torch.float64) for _ in range(N_IN)]
    return LayerFeatures(tensors, grid=GRID, layers=LAYERS)


def run(module, features, **kwargs):
    """The calling code that swaps fusers: one call for every family."""
    torch.manual_seed(1)  # the same instruction at every call
    text = torch.randn(features[0].shape[0], TEXT_DIM, dtype=torch.float64) if module.uses_text else None
    return module(features, text=text, **kwargs)


@pytest.mark.parametrize("pipeline", [False, True], ids=["fuser", "fusion_projector"])
@pytest.mark.parametrize("name", FUSERS)
def test_every_fuser_takes_the_same_arguments(name, pipeline):
    module = _build(name, pipeline)
    feats = _tapped()
    out = run(module, feats)
    # the grid the tap carries, the same grid passed explicitly, positionally, or on a plain list: one result
    torch.testing.assert_close(run(module, feats, grid=feats.grid), out, rtol=0, atol=0)
    torch.testing.assert_close(run(module, list(feats), grid=GRID), out, rtol=0, atol=0)
    level_grids = [GRID] * (N_IN - 1)
    torch.testing.assert_close(run(module, feats, grid=GRID, level_grids=level_grids), out, rtol=0, atol=0)
    torch.testing.assert_close(run(module, list(feats), grid=list(GRID), level_grids=level_grids), out, rtol=0, atol=0)


@pytest.mark.parametrize("pipeline", [False, True], ids=["fuser", "fusion_projector"])
@pytest.mark.parametrize("name", FUSERS)
def test_every_fuser_checks_what_it_does_not_use(name, pipeline):
    module = _build(name, pipeline)
    feats = _tapped()
    where = type(module.fuser if pipeline else module).__name__ + ".forward"
    with pytest.raises(ValueError, match=rf"{where}: grid=\(4, 3\) contradicts the grid the features carry \(features.grid=\(3, 4\)"):
        run(module, feats, grid=(4, 3))
    with pytest.raises(ValueError, match=r"\(2, 5\) = 10 tokens|\(2, 5\) = 10 tokens does not fit"):
        run(module, list(feats), grid=(2, 5))
    with pytest.raises(ValueError, match=r"level_grids expected 4 \(H, W\) pairs"):
        run(module, feats, grid=GRID, level_grids=[GRID] * 3)
    with pytest.raises(TypeError, match=r"expected a pair of ints \(H, W\), got 12"):
        run(module, feats, grid=12)


@pytest.mark.parametrize("name", [n for n in FUSERS if not n.startswith("instruction_gated")])
def test_an_instruction_is_refused_by_fusers_that_cannot_use_it(name):
    fuser = FUSERS[name]()
    assert not fuser.uses_text
    text = torch.randn(2, TEXT_DIM, dtype=torch.float64)
    with pytest.raises(
        TypeError, match=rf"{type(fuser).__name__}.forward: text \(an instruction embedding\) is only used by "
        rf"InstructionGatedFuser; {type(fuser).__name__} fuses without an instruction, got Tensor"
    ):
        fuser(_tapped(), text=text)


def test_gated_fuser_needs_its_instruction():
    fuser = FUSERS["instruction_gated"]()
    assert fuser.uses_text
    with pytest.raises(ValueError, match=r"InstructionGatedFuser.forward: text is required"):
        fuser(_tapped(), grid=GRID)


def test_checks_compile_fullgraph_and_export():
    # every family's own compile/export test runs these checks too; here with a preset, a tap's
    # LayerFeatures and an explicit grid, so the layer, prefix and grid checks are traced as well
    fuser = ConcatFuser.from_preset("dense_connector_dci", dim=C, depth=4, dtype=torch.float64)
    feats = LayerFeatures([torch.randn(2, 4, C, dtype=torch.float64) for _ in range(4)], grid=(2, 2), layers=(0, 1, 2, 3))
    compiled = torch.compile(fuser, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(feats, grid=(2, 2)), fuser(feats), rtol=0, atol=0)
    exported = torch.export.export(fuser, (list(feats),), {"grid": (2, 2)})
    torch.testing.assert_close(exported.module()(list(feats), grid=(2, 2)), fuser(feats), rtol=0, atol=0)
