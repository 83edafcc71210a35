"""Every bad input to the public API in one table: the call, the error type, and the words its message
must contain (the argument, what was expected, what came in). The next bad input is one more row.

Rows take ``tmp`` (a fresh folder) so that file cases can write the broken file they read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from layerfuse import (
    ConcatFuser,
    CrossAttentionFuser,
    FusionProjector,
    InstructionGatedFuser,
    LayerTap,
    MMFuser,
    Projector,
    TokenConcatFuser,
    WeightedSumFuser,
    build_projector,
    from_official,
)
from layerfuse.analysis import ImageFolderBatches, SyntheticImages, group_layers, plot_similarity
from layerfuse.cli.main import main as cli
from layerfuse.cli.models import load_model
from layerfuse.fusers import gate_entropy_loss
from layerfuse.layers import Attention, InstructionGate, LayerScale, MultiScaleDeformableAttention, sincos_2d
from layerfuse.ops import layer_mean, reference_points
from layerfuse.serialization import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    PretrainedMixin,
    load_tensor_file,
    read_json_file,
)
from layerfuse.text import mean_pool

NAN, INF = math.nan, math.inf


@dataclass(frozen=True)
class Row:
    id: str
    call: Callable[[Path], object]
    error: type[BaseException]
    words: tuple[str, ...]


def row(id: str, call: Callable[[Path], object], error: type[BaseException], *words: str) -> Row:
    return Row(id, call, error, words)


# ---------------------------------------------------------------------------------------------- inputs


def feats(n: int = 2, b: int = 2, t: int = 4, c: int = 8, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    return [torch.randn(b, t, c, dtype=dtype, device=device) for _ in range(n)]


def meta(module: torch.nn.Module) -> torch.nn.Module:
    return module.to("meta")


def mmfuser(**kw) -> MMFuser:
    return MMFuser(8, num_levels=1, heads=2, points=2, grid=(2, 2), **kw)


def cross(**kw) -> CrossAttentionFuser:
    return CrossAttentionFuser(8, num_levels=1, heads=2, grid=(2, 2), **kw)


def igva(**kw) -> InstructionGatedFuser:
    options = {"groups": [[1, 2], [3, 4]], "base_layer": -1, "gate_dim": 8, "num_blocks": 1, "num_heads": 2}
    return InstructionGatedFuser(8, 6, **{**options, **kw})


IGVA_INPUTS = 5  # 2 groups of 2 layers + the base layer


def pipeline() -> FusionProjector:
    return FusionProjector(ConcatFuser([8, 8]), Projector("linear", 16, 4), layers=[-2, -1])


def msda() -> MultiScaleDeformableAttention:
    return MultiScaleDeformableAttention(8, num_levels=1, heads=2, points=2)


def saved(tmp: Path, *, config: object = None, weights: bytes | None = None, raw_config: str | None = None) -> Path:
    """A save_pretrained folder, then with its config.json / model.safetensors replaced as asked."""
    folder = tmp / "saved"
    Projector("linear", 4, 3).save_pretrained(folder)
    if raw_config is not None:
        (folder / CONFIG_NAME).write_text(raw_config)
    elif config is not None:
        (folder / CONFIG_NAME).write_text(json.dumps(config))
    if weights is not None:
        (folder / WEIGHTS_NAME).write_bytes(weights)
    return folder


def truncated(tmp: Path, suffix: str) -> Path:
    """A checkpoint cut in half, as an interrupted download or copy leaves it."""
    path = tmp / f"ckpt{suffix}"
    tensors = {"model.mm_projector.0.weight": torch.randn(16, 16), "model.mm_projector.0.bias": torch.randn(16)}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def written(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def similarity_cli(*args: str) -> Callable[[Path], object]:
    return lambda tmp: cli(["similarity", "--model", "timm:vit_tiny_patch16_224", "--synthetic", "2", *args])


class Blocks(torch.nn.Module):
    """A 2-block ViT stand-in for LayerTap(blocks=...)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


# ------------------------------------------------------------------------------------------------ rows

ROWS = [
    # ConcatFuser: constructor
    row("concat in_dims int", lambda _: ConcatFuser(8), TypeError, "in_dims", "sequence of widths", "8"),
    row("concat in_dims empty", lambda _: ConcatFuser([]), TypeError, "in_dims", "non-empty"),
    row("concat in_dims zero", lambda _: ConcatFuser([8, 0]), ValueError, "in_dims[1]", "positive int", "0"),
    row("concat in_dims float", lambda _: ConcatFuser([8, 8.0]), TypeError, "in_dims[1]", "positive int", "float"),
    row("concat in_dims str", lambda _: ConcatFuser(["8"]), TypeError, "in_dims[0]", "positive int", "str"),
    row("concat terms str", lambda _: ConcatFuser([8, 8], terms="01"), TypeError, "terms", "sequence", "'01'"),
    row("concat terms out of range", lambda _: ConcatFuser([8, 8], terms=[0, 5]), ValueError, "terms[1]", "input 5", "2 inputs"),
    row("concat terms float", lambda _: ConcatFuser([8, 8], terms=[0, 1.5]), TypeError, "terms[1]", "input index", "1.5"),
    row("concat terms repeated", lambda _: ConcatFuser([8, 8], terms=[[0, 0], 1]), ValueError, "terms[0]", "twice"),
    row("concat unused input", lambda _: ConcatFuser([8, 8], terms=[0]), ValueError, "inputs [1]", "not used"),
    row("concat group widths", lambda _: ConcatFuser([8, 4], terms=[[0, 1]]), ValueError, "terms[0]", "different widths"),
    row("concat norm str", lambda _: ConcatFuser([8], norm="yes"), TypeError, "norm", "bool", "'yes'"),
    row("concat eps negative", lambda _: ConcatFuser([8], norm=True, eps=-1.0), ValueError, "eps", "> 0", "-1.0"),
    row("concat eps zero", lambda _: ConcatFuser([8], norm=True, eps=0.0), ValueError, "eps", "> 0", "0.0"),
    row("concat eps nan", lambda _: ConcatFuser([8], eps=NAN), ValueError, "eps", "finite", "nan"),
    row("concat eps inf", lambda _: ConcatFuser([8], eps=INF), ValueError, "eps", "finite", "inf"),
    row("concat eps str", lambda _: ConcatFuser([8], eps="x"), TypeError, "eps", "float", "str", "'x'"),
    row("concat drop_first_token int", lambda _: ConcatFuser([8], drop_first_token=1), TypeError, "drop_first_token", "bool"),
    # ConcatFuser: forward
    row("concat features tensor", lambda _: ConcatFuser([8, 8])(torch.zeros(2, 4, 8)), TypeError, "features", "sequence", "Tensor"),
    row("concat features none", lambda _: ConcatFuser([8, 8])(None), TypeError, "features", "sequence", "NoneType"),
    row("concat features count", lambda _: ConcatFuser([8, 8])(feats(3)), ValueError, "features", "2 tensors", "got 3"),
    row("concat features 2-d", lambda _: ConcatFuser([8])([torch.zeros(2, 8)]), ValueError, "features[0]", "3-d", "(2, 8)"),
    row("concat features int", lambda _: ConcatFuser([8])([torch.zeros(2, 4, 8, dtype=torch.long)]), TypeError, "features[0]", "floating-point", "torch.int64"),
    row("concat features str item", lambda _: ConcatFuser([8, 8])([torch.zeros(2, 4, 8), "x"]), TypeError, "features[1]", "torch.Tensor", "str"),
    row("concat width", lambda _: ConcatFuser([8, 8])(feats(2, c=6)), ValueError, "features[0]", "(B, N, 8)", "(2, 4, 6)"),
    row("concat batch", lambda _: ConcatFuser([8, 8])([torch.zeros(2, 4, 8), torch.zeros(3, 4, 8)]), ValueError, "features[1]", "batch size 3", "2"),
    row("concat tokens", lambda _: ConcatFuser([8, 8])([torch.zeros(2, 4, 8), torch.zeros(2, 5, 8)]), ValueError, "features[1]", "5 tokens", "4"),
    row("concat mixed dtypes", lambda _: ConcatFuser([8, 8])([torch.zeros(2, 4, 8), torch.zeros(2, 4, 8, dtype=torch.float64)]), TypeError, "features[1]", "torch.float64", "torch.float32"),
    row("concat norm float64 input", lambda _: ConcatFuser([8], norm=True)(feats(1, dtype=torch.float64)), TypeError, "ConcatFuser.forward", "features[0]", "torch.float64", "parameters are torch.float32"),
    row("concat norm device", lambda _: meta(ConcatFuser([8], norm=True))(feats(1)), ValueError, "ConcatFuser.forward", "features[0]", "cpu", "meta"),
    row("concat drop_first_token 1 token", lambda _: ConcatFuser([8], drop_first_token=True)(feats(1, t=1)), ValueError, "drop_first_token", "2 tokens", "1"),
    # TokenConcatFuser
    row("token dim zero", lambda _: TokenConcatFuser(0, 2), ValueError, "dim", "positive int", "0"),
    row("token num_inputs one", lambda _: TokenConcatFuser(8, 1), ValueError, "num_inputs", "at least 2", "1"),
    row("token pool", lambda _: TokenConcatFuser(8, 2, pool="3d"), ValueError, "pool", "'1d'", "'3d'"),
    row("token window float", lambda _: TokenConcatFuser(8, 2, window=2.5), TypeError, "window", "int", "2.5"),
    row("token window pair 1d", lambda _: TokenConcatFuser(8, 2, window=(2, 2)), TypeError, "window", "int", "(2, 2)"),
    row("token window 2d triple", lambda _: TokenConcatFuser(8, 2, pool="2d", window=(1, 2, 3)), TypeError, "window", "(kh, kw)"),
    row("token grid with 1d", lambda _: TokenConcatFuser(8, 2, grid=(2, 2)), ValueError, "grid", "pool='2d'"),
    row("token grid bad", lambda _: TokenConcatFuser(8, 2, pool="2d", grid=(2, 0)), ValueError, "grid", "positive", "(2, 0)"),
    row("token fewer tokens than window", lambda _: TokenConcatFuser(8, 2, window=8)(feats(2)), ValueError, "4 tokens", "window 8"),
    row("token 2d no grid", lambda _: TokenConcatFuser(8, 2, pool="2d", window=2)(feats(2, t=6)), ValueError, "patch grid", "6 tokens"),
    row("token 2d wrong grid", lambda _: TokenConcatFuser(8, 2, pool="2d", window=2)(feats(2), grid=(3, 3)), ValueError, "(3, 3)", "9 tokens", "4 tokens"),
    row("token features int", lambda _: TokenConcatFuser(8, 2)([torch.zeros(1, 8, 8, dtype=torch.int32)] * 2), TypeError, "features[0]", "floating-point", "torch.int32"),
    # WeightedSumFuser
    row("wsum num_inputs zero", lambda _: WeightedSumFuser(8, 0), ValueError, "num_inputs", "positive int", "0"),
    row("wsum normalize", lambda _: WeightedSumFuser(8, 2, normalize="l1"), ValueError, "normalize", "'softmax'", "'l1'"),
    row("wsum layer_proj str", lambda _: WeightedSumFuser(8, 2, layer_proj="yes"), TypeError, "layer_proj", "bool"),
    row("wsum layer_proj_dim alone", lambda _: WeightedSumFuser(8, 2, layer_proj_dim=4), ValueError, "layer_proj_dim=4", "layer_proj=True"),
    row("wsum init_weights nan", lambda _: WeightedSumFuser(8, 2, normalize="none", init_weights=[NAN, 1.0]), ValueError, "init_weights[0]", "finite", "nan"),
    row("wsum init_weights inf", lambda _: WeightedSumFuser(8, 2, normalize="none", init_weights=[1.0, INF]), ValueError, "init_weights[1]", "finite", "inf"),
    row("wsum init_weights str", lambda _: WeightedSumFuser(8, 2, init_weights="ab"), TypeError, "init_weights", "sequence of floats", "'ab'"),
    row("wsum init_weights item str", lambda _: WeightedSumFuser(8, 2, init_weights=[0.5, "x"]), TypeError, "init_weights[1]", "float", "'x'"),
    row("wsum init_weights count", lambda _: WeightedSumFuser(8, 2, init_weights=[1.0]), ValueError, "init_weights", "2 values", "got 1"),
    row("wsum init_weights softmax sum", lambda _: WeightedSumFuser(8, 2, init_weights=[0.2, 0.2]), ValueError, "init_weights", "sum to 1", "0.2"),
    row("wsum init_weights softmax zero", lambda _: WeightedSumFuser(8, 2, init_weights=[0.0, 1.0]), ValueError, "init_weights", "positive"),
    row("wsum eps negative", lambda _: WeightedSumFuser(8, 2, layer_proj=True, eps=-1.0), ValueError, "eps", "> 0", "-1.0"),
    row("wsum eps str", lambda _: WeightedSumFuser(8, 2, eps="x"), TypeError, "eps", "float", "'x'"),
    row("wsum float64 input", lambda _: WeightedSumFuser(8, 2)(feats(2, dtype=torch.float64)), TypeError, "features[0]", "torch.float64", "torch.float32"),
    row("wsum device", lambda _: meta(WeightedSumFuser(8, 2))(feats(2)), ValueError, "features[0]", "cpu", "meta"),
    row("wsum features count", lambda _: WeightedSumFuser(8, 2)(feats(1)), ValueError, "features", "2 tensors", "got 1"),
    # MMFuser
    row("mmfuser dim str", lambda _: MMFuser("8"), TypeError, "dim", "positive int", "'8'"),
    row("mmfuser heads not dividing", lambda _: MMFuser(8, 1, heads=3), ValueError, "dim=8", "heads=3"),
    row("mmfuser points zero", lambda _: MMFuser(8, 1, 2, points=0), ValueError, "points", "positive int", "0"),
    row("mmfuser query_index range", lambda _: MMFuser(8, 1, 2, query_index=5), ValueError, "query_index", "5"),
    row("mmfuser query_index float", lambda _: MMFuser(8, 1, 2, query_index=-1.0), TypeError, "query_index", "int", "float"),
    row("mmfuser grid", lambda _: MMFuser(8, 1, 2, grid=(2,)), TypeError, "grid", "pair of ints", "(2,)"),
    row("mmfuser eps negative", lambda _: mmfuser(eps=-1.0), ValueError, "eps", "> 0", "-1.0"),
    row("mmfuser eps str", lambda _: mmfuser(eps="x"), TypeError, "eps", "float", "'x'"),
    row("mmfuser layer_scale_init nan", lambda _: mmfuser(layer_scale_init=NAN), ValueError, "layer_scale_init", "finite", "nan"),
    row("mmfuser backend", lambda _: mmfuser(backend="cuda-magic"), ValueError, "backend", "'auto'", "'cuda-magic'"),
    row("mmfuser float64 input", lambda _: mmfuser()(feats(2, dtype=torch.float64)), TypeError, "MMFuser.forward", "features[0]", "torch.float64", "torch.float32"),
    row("mmfuser meta module", lambda _: meta(mmfuser())(feats(2)), ValueError, "MMFuser.forward", "features[0]", "cpu", "meta"),
    row("mmfuser width", lambda _: mmfuser()(feats(2, c=4)), ValueError, "features[0]", "(B, N, 8)"),
    row("mmfuser grid mismatch", lambda _: mmfuser()(feats(2, t=5)), ValueError, "(2, 2)", "5 tokens"),
    row("mmfuser level_grids count", lambda _: mmfuser()(feats(2), level_grids=[(2, 2), (2, 2)]), ValueError, "level_grids", "1 (H, W) pairs", "got 2"),
    row("mmfuser level_grids str", lambda _: mmfuser()(feats(2), level_grids="ab"), TypeError, "level_grids", "(H, W) pairs", "str"),
    row("mmfuser grid float", lambda _: mmfuser()(feats(2), grid=(2.0, 2)), TypeError, "grid", "pair of ints"),
    # CrossAttentionFuser
    row("cross window zero", lambda _: cross(window=0), ValueError, "window", "positive int", "0"),
    row("cross window too big", lambda _: cross(window=3)(feats(2)), ValueError, "window=3", "(2, 2)"),
    row("cross pos_embed width", lambda _: CrossAttentionFuser(6, 1, heads=2), ValueError, "pos_embed=True", "multiple of 4", "dim=6"),
    row("cross pos_embed str", lambda _: cross(pos_embed="no"), TypeError, "pos_embed", "bool", "'no'"),
    row("cross self_attn int", lambda _: cross(self_attn=1), TypeError, "self_attn", "bool"),
    row("cross mlp_ratio negative", lambda _: cross(mlp_ratio=-1.0), ValueError, "mlp_ratio", ">= 0", "-1.0"),
    row("cross mlp_ratio nan", lambda _: cross(mlp_ratio=NAN), ValueError, "mlp_ratio", "finite", "nan"),
    row("cross mlp_ratio str", lambda _: cross(mlp_ratio="2"), TypeError, "mlp_ratio", "float", "'2'"),
    row("cross attn_drop one", lambda _: cross(attn_drop=1.0), ValueError, "attn_drop", "[0, 1)", "1.0"),
    row("cross attn_drop str", lambda _: cross(attn_drop="x"), TypeError, "attn_drop", "float", "'x'"),
    row("cross eps negative", lambda _: cross(eps=-1.0), ValueError, "eps", "> 0", "-1.0"),
    row("cross eps nan", lambda _: cross(eps=NAN), ValueError, "eps", "finite", "nan"),
    row("cross layer_scale_init inf", lambda _: cross(layer_scale_init=INF), ValueError, "layer_scale_init", "finite", "inf"),
    row("cross backend", lambda _: cross(backend="flash9"), ValueError, "backend", "'flash9'"),
    row("cross float64 input", lambda _: cross()(feats(2, dtype=torch.float64)), TypeError, "CrossAttentionFuser.forward", "features[0]", "torch.float64", "torch.float32"),
    row("cross bf16 input", lambda _: cross()(feats(2, dtype=torch.bfloat16)), TypeError, "features[0]", "torch.bfloat16", "torch.float32"),
    row("cross meta module", lambda _: meta(cross())(feats(2)), ValueError, "features[0]", "cpu", "meta"),
    row("cross features count", lambda _: cross()(feats(3)), ValueError, "features", "2 tensors", "got 3"),
    # InstructionGatedFuser
    row("igva groups str", lambda _: igva(groups="abc"), TypeError, "groups", "sequence", "'abc'"),
    row("igva groups float", lambda _: igva(groups=[[1.5, 2]]), TypeError, "groups[0]", "ints", "1.5"),
    row("igva groups gap", lambda _: igva(groups=[[1, 3]]), ValueError, "groups[0]", "contiguous", "[1, 3]"),
    row("igva groups overlap", lambda _: igva(groups=[[1, 2], [2, 3]]), ValueError, "layer 2", "overlap"),
    row("igva groups negative", lambda _: igva(groups=[[-1, 0]]), ValueError, "groups[0]", ">= 0"),
    row("igva base_layer float", lambda _: igva(base_layer=1.5), TypeError, "base_layer", "int", "1.5"),
    row("igva has_cls str", lambda _: igva(has_cls="yes"), TypeError, "has_cls", "bool", "'yes'"),
    row("igva gated str", lambda _: igva(gated="no"), TypeError, "gated", "bool", "'no'"),
    row("igva stage1 with gate options", lambda _: igva(gated=False, zero_init_head=True), ValueError, "gated=False", "no gate"),
    row("igva text missing", lambda _: igva()(feats(IGVA_INPUTS)), ValueError, "text is required", "(B, 6)"),
    row("igva text shape", lambda _: igva()(feats(IGVA_INPUTS), text=torch.zeros(2, 5)), ValueError, "text", "(B, 6)", "(2, 5)"),
    row("igva text int", lambda _: igva()(feats(IGVA_INPUTS), text=torch.zeros(2, 6, dtype=torch.long)), TypeError, "text", "floating-point", "torch.int64"),
    row("igva text list", lambda _: igva()(feats(IGVA_INPUTS), text=[0.0] * 6), TypeError, "text", "torch.Tensor", "list"),
    row("igva text on stage1", lambda _: igva(gated=False)(feats(IGVA_INPUTS), text=torch.zeros(2, 6)), ValueError, "text must be None", "gated=False"),
    row("igva text meta", lambda _: igva()(feats(IGVA_INPUTS), text=torch.zeros(2, 6, device="meta")), ValueError, "text", "meta", "cpu"),
    row("igva float64 features", lambda _: igva()(feats(IGVA_INPUTS, dtype=torch.float64), text=torch.zeros(2, 6)), TypeError, "features[0]", "torch.float64", "torch.float32"),
    row("igva one token", lambda _: igva()(feats(IGVA_INPUTS, t=1), text=torch.zeros(2, 6)), ValueError, "has_cls=True", "1 token"),
    row("igva gate_weights float64", lambda _: igva().gate_weights(feats(IGVA_INPUTS, dtype=torch.float64), text=torch.zeros(2, 6)), TypeError, "gate_weights", "torch.float64"),
    row("igva group_means count", lambda _: igva().group_means(feats(2)), ValueError, "group_means", "5 tensors", "got 2"),
    row("gate_entropy_loss list", lambda _: gate_entropy_loss([0.5, 0.5]), TypeError, "weights", "torch.Tensor", "list"),
    row("gate_entropy_loss 1-d", lambda _: gate_entropy_loss(torch.ones(3)), ValueError, "weights", "(B, K)", "(3,)"),
    # Projector / build_projector
    row("projector kind none", lambda _: build_projector(None, 4, 4), TypeError, "kind", "projector type string", "None"),
    row("projector kind int", lambda _: Projector(2, 4, 4), TypeError, "kind", "string", "int"),
    row("projector kind unknown", lambda _: Projector("mlp0x_gelu", 4, 4), ValueError, "kind", "mlp{N}x_gelu", "'mlp0x_gelu'"),
    row("projector kind typo", lambda _: build_projector("mlp2x_relu", 4, 4), ValueError, "kind", "'mlp2x_relu'"),
    row("projector identity dims", lambda _: Projector("identity", 4, 5), ValueError, "identity", "in_dim == out_dim"),
    row("projector in_dim zero", lambda _: Projector("linear", 0, 4), ValueError, "in_dim", "positive int", "0"),
    row("projector out_dim float", lambda _: Projector("linear", 4, 4.0), TypeError, "out_dim", "positive int", "float"),
    row("projector 0-d input", lambda _: Projector("linear", 4, 3)(torch.tensor(1.0)), ValueError, "Projector.forward", "x", "(*, 4)", "()"),
    row("projector width", lambda _: Projector("linear", 4, 3)(torch.zeros(2, 5)), ValueError, "x", "(*, 4)", "(2, 5)"),
    row("projector list input", lambda _: Projector("linear", 4, 3)([1.0] * 4), TypeError, "x", "torch.Tensor", "list"),
    row("projector float64 input", lambda _: Projector("mlp2x_gelu", 4, 3)(torch.zeros(2, 4, dtype=torch.float64)), TypeError, "Projector.forward", "x", "torch.float64", "torch.float32"),
    row("projector int input", lambda _: Projector("linear", 4, 3)(torch.zeros(2, 4, dtype=torch.long)), TypeError, "x", "floating-point", "torch.int64"),
    row("projector meta module", lambda _: meta(Projector("linear", 4, 3))(torch.zeros(2, 4)), ValueError, "Projector.forward", "x", "cpu", "meta"),
    # FusionProjector
    row("pipeline fuser type", lambda _: FusionProjector(Projector("linear", 4, 4), Projector("linear", 4, 4), layers=[1]), TypeError, "fuser", "Fuser", "Projector"),
    row("pipeline projector type", lambda _: FusionProjector(ConcatFuser([8]), torch.nn.Linear(8, 4), layers=[1]), TypeError, "projector", "Projector", "Linear"),
    row("pipeline width", lambda _: FusionProjector(ConcatFuser([8]), Projector("linear", 4, 4), layers=[1]), ValueError, "projector.in_dim", "8", "4"),
    row("pipeline layers str", lambda _: FusionProjector(ConcatFuser([8, 8, 8]), Projector("linear", 24, 4), layers="abc"), TypeError, "layers", "int indices", "'abc'"),
    row("pipeline layers float", lambda _: FusionProjector(ConcatFuser([8, 8, 8]), Projector("linear", 24, 4), layers=[1.5, 2, 3]), TypeError, "layers[0]", "int", "1.5"),
    row("pipeline layers count", lambda _: FusionProjector(ConcatFuser([8, 8]), Projector("linear", 16, 4), layers=[1]), ValueError, "layers", "2 indices", "[1]"),
    row("pipeline layers int", lambda _: FusionProjector(ConcatFuser([8]), Projector("linear", 8, 4), layers=3), TypeError, "layers", "sequence", "int"),
    row("pipeline tokens", lambda _: FusionProjector(ConcatFuser([8]), Projector("linear", 8, 4), layers=[1], tokens="cls"), ValueError, "tokens", "'patch'", "'cls'"),
    row("pipeline float64 input", lambda _: pipeline()(feats(2, dtype=torch.float64)), TypeError, "FusionProjector.forward", "features[0]", "torch.float64", "torch.float32"),
    row("pipeline meta module", lambda _: meta(pipeline())(feats(2)), ValueError, "FusionProjector.forward", "cpu", "meta"),
    # device= and dtype= of every module constructor
    *[
        row(f"{name} dtype {bad!r}", lambda _, build=build, bad=bad: build(dtype=bad), TypeError, "dtype", "floating-point torch.dtype", repr(bad))
        for name, build in [
            ("concat", lambda **kw: ConcatFuser([8], norm=True, **kw)),
            ("token", lambda **kw: TokenConcatFuser(8, 2, **kw)),
            ("wsum", lambda **kw: WeightedSumFuser(8, 2, **kw)),
            ("mmfuser", lambda **kw: mmfuser(**kw)),
            ("cross", lambda **kw: cross(**kw)),
            ("igva", lambda **kw: igva(**kw)),
            ("projector", lambda **kw: Projector("linear", 4, 4, **kw)),
            ("attention", lambda **kw: Attention(8, 2, **kw)),
            ("msda", lambda **kw: MultiScaleDeformableAttention(8, 1, 2, 2, **kw)),
            ("gate", lambda **kw: InstructionGate(6, 8, 2, dim=8, num_blocks=1, num_heads=2, **kw)),
            ("layer_scale", lambda **kw: LayerScale(8, **kw)),
        ]
        for bad in (torch.int64, "float32")
    ],
    *[
        row(f"{name} device {bad}", lambda _, build=build, bad=bad: build(device=bad), ValueError, "device", repr(bad))
        for name, build in [
            ("concat", lambda **kw: ConcatFuser([8], norm=True, **kw)),
            ("wsum", lambda **kw: WeightedSumFuser(8, 2, **kw)),
            ("mmfuser", lambda **kw: mmfuser(**kw)),
            ("cross", lambda **kw: cross(**kw)),
            ("projector", lambda **kw: Projector("linear", 4, 4, **kw)),
            ("layer_scale", lambda **kw: LayerScale(8, **kw)),
        ]
        for bad in ("bogus", "cuda:7")
    ],
    # layers
    row("attention heads", lambda _: Attention(8, heads=3), ValueError, "heads=3", "dim=8"),
    row("attention attn_drop nan", lambda _: Attention(8, 2, attn_drop=NAN), ValueError, "attn_drop", "finite", "nan"),
    row("attention qkv_bias str", lambda _: Attention(8, 2, qkv_bias="no"), TypeError, "qkv_bias", "bool"),
    row("attention float64 input", lambda _: Attention(8, 2)(torch.zeros(1, 3, 8, dtype=torch.float64)), TypeError, "Attention.forward", "x", "torch.float64", "torch.float32"),
    row("attention context device", lambda _: meta(Attention(8, 2))(torch.zeros(1, 3, 8)), ValueError, "Attention.forward", "x", "cpu", "meta"),
    row("attention x 2-d", lambda _: Attention(8, 2)(torch.zeros(3, 8)), ValueError, "Attention.forward", "x", "(B, N, 8)", "(3, 8)"),
    row("attention x list", lambda _: Attention(8, 2)([1.0]), TypeError, "x", "torch.Tensor", "list"),
    row("attention context width", lambda _: Attention(8, 2)(torch.zeros(1, 3, 8), torch.zeros(1, 3, 4)), ValueError, "context", "(B, M, 8)", "(1, 3, 4)"),
    row("attention context batch", lambda _: Attention(8, 2)(torch.zeros(1, 3, 8), torch.zeros(2, 3, 8)), ValueError, "context", "batch size 2", "1"),
    row("attention window without grid", lambda _: Attention(8, 2)(torch.zeros(1, 4, 8), window=2), ValueError, "window", "query_grid"),
    row("msda spatial_shapes str", lambda _: msda()(torch.zeros(1, 4, 8), reference_points((2, 2)), torch.zeros(1, 4, 8), "ab"), TypeError, "spatial_shapes", "(H, W)", "str"),
    row("msda query list", lambda _: msda()([0.0], reference_points((2, 2)), torch.zeros(1, 4, 8), [(2, 2)]), TypeError, "query", "torch.Tensor", "list"),
    row("msda dims", lambda _: MultiScaleDeformableAttention(8, heads=3), ValueError, "dim=8", "heads=3"),
    row("msda float64 query", lambda _: msda()(torch.zeros(1, 4, 8, dtype=torch.float64), reference_points((2, 2)), torch.zeros(1, 4, 8, dtype=torch.float64), [(2, 2)]), TypeError, "query", "torch.float64", "torch.float32"),
    row("msda meta module", lambda _: meta(msda())(torch.zeros(1, 4, 8), reference_points((2, 2)), torch.zeros(1, 4, 8), [(2, 2)]), ValueError, "query", "cpu", "meta"),
    row("msda shapes count", lambda _: msda()(torch.zeros(1, 4, 8), reference_points((2, 2)), torch.zeros(1, 4, 8), [(2, 2), (1, 1)]), ValueError, "spatial_shapes", "1 (H, W) pairs"),
    row("msda shapes tokens", lambda _: msda()(torch.zeros(1, 4, 8), reference_points((2, 2)), torch.zeros(1, 5, 8), [(2, 2)]), ValueError, "spatial_shapes", "4 value tokens", "5"),
    row("msda reference shape", lambda _: msda()(torch.zeros(1, 4, 8), torch.zeros(3, 2), torch.zeros(1, 4, 8), [(2, 2)]), ValueError, "reference_points", "(3, 2)"),
    row("msda reference int", lambda _: msda()(torch.zeros(1, 4, 8), torch.zeros(4, 2, dtype=torch.long), torch.zeros(1, 4, 8), [(2, 2)]), TypeError, "reference_points", "floating-point"),
    row("gate float64 text", lambda _: InstructionGate(6, 8, 2, dim=8, num_blocks=1, num_heads=2)(torch.zeros(2, 6, dtype=torch.float64), torch.zeros(2, 2, 8)), TypeError, "InstructionGate.forward", "text", "torch.float64"),
    row("gate text width", lambda _: InstructionGate(6, 8, 2, dim=8, num_blocks=1, num_heads=2)(torch.zeros(2, 5), torch.zeros(2, 2, 8)), ValueError, "text", "(B, 6)", "(2, 5)"),
    row("gate summaries groups", lambda _: InstructionGate(6, 8, 2, dim=8, num_blocks=1, num_heads=2)(torch.zeros(2, 6), torch.zeros(2, 3, 8)), ValueError, "summaries", "(2, 2, 8)", "(2, 3, 8)"),
    row("gate num_heads", lambda _: InstructionGate(6, 8, 2, dim=8, num_heads=3), ValueError, "num_heads=3", "dim=8"),
    row("gate zero_init_head str", lambda _: InstructionGate(6, 8, 2, zero_init_head="yes"), TypeError, "zero_init_head", "bool"),
    row("layer_scale init nan", lambda _: LayerScale(8, NAN), ValueError, "init_value", "finite", "nan"),
    row("layer_scale init str", lambda _: LayerScale(8, "0"), TypeError, "init_value", "float", "'0'"),
    row("layer_scale dim", lambda _: LayerScale(0), ValueError, "dim", "positive int", "0"),
    row("layer_scale width", lambda _: LayerScale(8)(torch.zeros(2, 4)), ValueError, "x", "(*, 8)", "(2, 4)"),
    row("layer_scale meta", lambda _: meta(LayerScale(8))(torch.zeros(2, 8)), ValueError, "LayerScale.forward", "x", "cpu", "meta"),
    row("sincos dim", lambda _: sincos_2d((2, 2), 6), ValueError, "dim", "multiple of 4", "6"),
    row("sincos grid", lambda _: sincos_2d((2, 0), 8), ValueError, "grid", "positive", "(2, 0)"),
    row("sincos temperature", lambda _: sincos_2d((2, 2), 8, temperature=-1.0), ValueError, "temperature", "> 0", "-1.0"),
    row("sincos temperature str", lambda _: sincos_2d((2, 2), 8, temperature="x"), TypeError, "temperature", "float"),
    # ops
    row("layer_mean empty", lambda _: layer_mean([]), ValueError, "tensors", "at least one"),
    row("layer_mean tensor", lambda _: layer_mean(torch.zeros(2, 3)), TypeError, "tensors", "sequence", "Tensor"),
    row("layer_mean int", lambda _: layer_mean([torch.zeros(2, 3, dtype=torch.long)]), TypeError, "tensors[0]", "floating-point", "torch.int64"),
    row("layer_mean shapes", lambda _: layer_mean([torch.zeros(2, 3), torch.zeros(2, 4)]), ValueError, "tensors[1]", "(2, 4)", "(2, 3)"),
    row("reference_points device", lambda _: reference_points((2, 2), device="bogus"), ValueError, "device", "'bogus'"),
    row("mean_pool list", lambda _: mean_pool([1.0], torch.ones(2, 4)), TypeError, "hidden", "torch.Tensor", "list"),
    row("mean_pool mask shape", lambda _: mean_pool(torch.zeros(2, 3, 4), torch.ones(2, 4)), ValueError, "attention_mask", "(2, 4)", "(2, 3, 4)"),
    row("mean_pool empty row", lambda _: mean_pool(torch.zeros(2, 3, 4), torch.zeros(2, 3)), ValueError, "attention_mask", "without any token"),
    row("reference_points grid", lambda _: reference_points((2, -1)), ValueError, "grid", "positive", "(2, -1)"),
    # LayerFeatures / LayerTap
    row("tap layers str", lambda _: LayerTap(Blocks(), "abc", blocks="blocks"), ValueError, "layers", "'all'", "'abc'"),
    row("tap layers float", lambda _: LayerTap(Blocks(), [1.5, 2], blocks="blocks"), TypeError, "layers", "ints", "1.5"),
    row("tap layers int", lambda _: LayerTap(Blocks(), 2, blocks="blocks"), TypeError, "layers", "sequence of ints", "2"),
    row("tap layer out of range", lambda _: LayerTap(Blocks(), [5], blocks="blocks"), ValueError, "5"),
    row("tap tokens", lambda _: LayerTap(Blocks(), [1], blocks="blocks", tokens="cls"), ValueError, "tokens", "'cls'"),
    # analysis
    row("group_layers k", lambda _: group_layers(torch.eye(3), k=4), ValueError, "k=4", "at least 4 layers", "got 3"),
    row("group_layers k float", lambda _: group_layers(torch.eye(3), k=1.5), TypeError, "k", "positive int", "1.5"),
    row("synthetic images seed", lambda _: SyntheticImages(2, image_size=8, seed="x"), TypeError, "seed", "int", "'x'"),
    row("image folder crop str", lambda tmp: ImageFolderBatches(_images(tmp), image_size=8, mean=(0, 0, 0), std=(1, 1, 1), crop_pct="x"), TypeError, "crop_pct", "float", "'x'"),
    row("image folder crop nan", lambda tmp: ImageFolderBatches(_images(tmp), image_size=8, mean=(0, 0, 0), std=(1, 1, 1), crop_pct=NAN), ValueError, "crop_pct", "finite", "nan"),
    row("image folder mean str", lambda tmp: ImageFolderBatches(_images(tmp), image_size=8, mean="abc", std=(1, 1, 1)), TypeError, "mean", "sequence of floats", "'abc'"),
    row("image folder std zero", lambda tmp: ImageFolderBatches(_images(tmp), image_size=8, mean=(0, 0, 0), std=(1, 0, 1)), ValueError, "std[1]", "> 0", "0.0"),
    row("image folder std nan", lambda tmp: ImageFolderBatches(_images(tmp), image_size=8, mean=(0, 0, 0), std=(1, NAN, 1)), ValueError, "std[1]", "finite", "nan"),
    row("image folder truncated image", lambda tmp: list(ImageFolderBatches(_images(tmp, broken=True), image_size=8, mean=(0, 0, 0), std=(1, 1, 1))), ValueError, "broken.png", "not a readable image"),
    row("group_layers nan", lambda _: group_layers(torch.full((3, 3), NAN), k=2), ValueError, "NaN"),
    row("group_layers list", lambda _: group_layers([[1.0]], k=1), TypeError, "similarity"),
    row("plot path int", lambda _: plot_similarity(torch.eye(3), 5), TypeError, "path", "file path", "int"),
    row("plot scale unknown", lambda tmp: plot_similarity(torch.eye(3), tmp / "x.png", scale="yes"), ValueError, "scale", "'robust'", "'yes'"),
    row("plot dpi zero", lambda tmp: plot_similarity(torch.eye(3), tmp / "x.png", dpi=0), ValueError, "dpi", "positive int"),
    row("plot groups list", lambda tmp: plot_similarity(torch.eye(3), tmp / "x.png", groups=[[0, 1]]), TypeError, "groups", "LayerGroups", "list"),
    row("synthetic images zero", lambda _: SyntheticImages(0, image_size=8), ValueError, "num_images", "positive int", "0"),
    # from_official
    row("official method", lambda _: from_official("llava", {}), ValueError, "method", "'mmfuser'", "'llava'"),
    row("official unknown option", lambda _: from_official("dense_connector", {}, foo=1), TypeError, "'dense_connector'", "variant", "unknown foo"),
    row("official dtype str", lambda _: from_official("dense_connector", {}, dtype="float32"), TypeError, "from_official", "dtype", "'float32'"),
    row("official state type", lambda _: from_official("mmfuser", 3), TypeError, "state_dict", "mapping", "int"),
    row("official missing file", lambda tmp: from_official("mmfuser", tmp / "none.bin"), FileNotFoundError, "none.bin", "does not exist"),
    row("official folder", lambda tmp: from_official("mmfuser", tmp), FileNotFoundError, "is a folder", "mm_projector.bin"),
    row("official truncated safetensors", lambda tmp: from_official("dense_connector", truncated(tmp, ".safetensors")), ValueError, "from_official", "ckpt.safetensors", "truncated"),
    row("official truncated bin", lambda tmp: from_official("dense_connector", truncated(tmp, ".bin")), ValueError, "from_official", "ckpt.bin", "truncated"),
    row("official text as bin", lambda tmp: from_official("mmfuser", written(tmp, "mm_projector.bin", "not a checkpoint")), ValueError, "mm_projector.bin", "torch.save"),
    row("official nested dict", lambda tmp: from_official("mmfuser", _nested(tmp)), TypeError, "nested.bin", "'model'", "nested state dict"),
    # serialization
    row("load dtype int", lambda tmp: Projector.from_pretrained(saved(tmp), dtype=torch.int32), TypeError, "from_pretrained", "dtype", "torch.int32"),
    row("load device bogus", lambda tmp: Projector.from_pretrained(saved(tmp), device="bogus"), ValueError, "from_pretrained", "device", "'bogus'"),
    row("load directory none", lambda _: Projector.from_pretrained(None), TypeError, "from_pretrained", "directory", "NoneType"),
    row("load missing config", lambda tmp: Projector.from_pretrained(tmp / "nothing"), FileNotFoundError, "config.json", "nothing"),
    row("load invalid json", lambda tmp: Projector.from_pretrained(saved(tmp, raw_config='{"class": "Projector",')), ValueError, "config.json", "not valid JSON", "line 1"),
    row("load json list", lambda tmp: Projector.from_pretrained(saved(tmp, config=[1, 2])), ValueError, "config.json", "JSON object", "list"),
    row("load json string", lambda tmp: Projector.from_pretrained(saved(tmp, config="Projector")), ValueError, "config.json", "JSON object", "str"),
    row("load no config field", lambda tmp: Projector.from_pretrained(saved(tmp, config={"class": "Projector"})), ValueError, "config.json", '"config"', 'no "config" field'),
    row("load config field list", lambda tmp: Projector.from_pretrained(saved(tmp, config={"class": "Projector", "config": [1]})), ValueError, "config.json", '"config"', "list"),
    row("load no class field", lambda tmp: Projector.from_pretrained(saved(tmp, config={"config": {}})), ValueError, "config.json", '"class"', "None"),
    row("load unknown class", lambda tmp: PretrainedMixin.from_pretrained(saved(tmp, config={"class": "Nope", "config": {}})), ValueError, "config.json", "'Nope'", "does not know"),
    row("load bad config args", lambda tmp: Projector.from_pretrained(saved(tmp, config={"class": "Projector", "config": {"kind": "linear", "in_dim": 4}})), TypeError, "config.json", "does not build a Projector", "out_dim"),
    row("load bad config value", lambda tmp: Projector.from_pretrained(saved(tmp, config={"class": "Projector", "config": {"kind": "linear", "in_dim": -4, "out_dim": 3}})), ValueError, "config.json", "in_dim", "-4"),
    row("load pipeline config without fuser", lambda tmp: FusionProjector.from_pretrained(saved(tmp, config={"class": "FusionProjector", "config": {"projector": {}}})), ValueError, "config.json", "'fuser'"),
    row("load truncated weights", lambda tmp: Projector.from_pretrained(saved(tmp, weights=b"\x08\x00\x00\x00\x00\x00\x00\x00{}")), ValueError, "model.safetensors", "truncated"),
    row("load empty weights", lambda tmp: Projector.from_pretrained(saved(tmp, weights=b"")), ValueError, "model.safetensors", "0 bytes"),
    row("load missing weights", lambda tmp: Projector.from_pretrained(_without_weights(tmp)), FileNotFoundError, "model.safetensors"),
    row("read_json_file bytes", lambda tmp: read_json_file(_binary(tmp), where="test"), ValueError, "blob.json", "UTF-8"),
    row("load_tensor_file truncated", lambda tmp: load_tensor_file(truncated(tmp, ".safetensors"), where="test"), ValueError, "test", "ckpt.safetensors", "not a readable safetensors file"),
    # command line
    row("cli checkpoint truncated", lambda tmp: load_model("timm:vit_tiny_patch16_224", checkpoint=truncated(tmp, ".safetensors")), ValueError, "load_model", "ckpt.safetensors", "truncated"),
    row("cli hf config invalid", lambda tmp: load_model(f"hf:{_hf_folder(tmp, '{')}"), ValueError, "config.json", "not valid JSON"),
    row("cli hf preprocessor list", lambda tmp: load_model(f"hf:{_hf_folder(tmp, None, preprocessor='[1]')}"), ValueError, "preprocessor_config.json", "JSON object", "list"),
    row("cli similarity device bogus", similarity_cli("--device", "bogus"), SystemExit, "--device", "torch device", "'bogus'"),
    row("cli similarity device missing gpu", similarity_cli("--device", "cuda:7"), SystemExit, "--device", "'cuda:7'"),
    row("cli similarity layers", similarity_cli("--layers", "abc"), SystemExit, "--layers", "integers", "'abc'"),
    row("cli similarity layers float", similarity_cli("--layers", "1.5,2"), SystemExit, "--layers", "'1.5,2'"),
    row("cli similarity k", similarity_cli("--k", "0"), SystemExit, "--k", "positive", "0"),
    row("cli similarity checkpoint truncated", lambda tmp: cli(["similarity", "--model", "timm:vit_tiny_patch16_224", "--synthetic", "2", "--checkpoint", str(truncated(tmp, ".bin"))]), SystemExit, "ckpt.bin", "truncated"),
    row("cli demo device", lambda _: cli(["demo", "--small", "--device", "bogus"]), SystemExit, "--device", "'bogus'"),
]


def _nested(tmp: Path) -> Path:
    path = tmp / "nested.bin"
    torch.save({"model": {"mm_projector.0.weight": torch.zeros(2, 2)}, "step": torch.tensor(3)}, path)
    return path


def _images(tmp: Path, *, broken: bool = False) -> Path:
    image = pytest.importorskip("PIL.Image")
    folder = tmp / "images"
    folder.mkdir(exist_ok=True)
    image.new("RGB", (8, 8), (10, 20, 30)).save(folder / "ok.png")
    if broken:
        image.new("RGB", (64, 64), (10, 20, 30)).save(folder / "broken.png")
        data = (folder / "broken.png").read_bytes()
        (folder / "broken.png").write_bytes(data[: len(data) // 2])
    return folder


def _without_weights(tmp: Path) -> Path:
    folder = saved(tmp)
    (folder / WEIGHTS_NAME).unlink()
    return folder


def _binary(tmp: Path) -> Path:
    path = tmp / "blob.json"
    path.write_bytes(b"\xff\xfe\x00\x01")
    return path


def _hf_folder(tmp: Path, config: str | None, *, preprocessor: str | None = None) -> Path:
    transformers = pytest.importorskip("transformers")
    folder = tmp / "hf"
    folder.mkdir()
    if config is None:
        vision = transformers.CLIPVisionConfig(
            hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4
        )
        vision.save_pretrained(folder)
    else:
        (folder / "config.json").write_text(config)
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(preprocessor)
    return folder


@pytest.mark.parametrize("case", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_gives_one_clear_error(case: Row, tmp_path: Path) -> None:
    with pytest.raises(case.error) as info:
        case.call(tmp_path)
    message = str(info.value.code if isinstance(info.value, SystemExit) else info.value)
    missing = [w for w in case.words if w not in message]
    assert not missing, f"message lacks {missing}: {message}"
    # raised by our checks, not by PyTorch or a library deep inside the call
    assert "Traceback" not in message


def test_row_ids_are_unique() -> None:
    assert len({r.id for r in ROWS}) == len(ROWS)
