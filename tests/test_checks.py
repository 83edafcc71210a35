import pytest
import torch

from layerfuse import Projector
from layerfuse._checks import (
    check_bool,
    check_choice,
    check_device,
    check_feature_list,
    check_float,
    check_grid,
    check_index_list,
    check_module_inputs,
    check_positive_int,
    check_widths,
    factory_kwargs,
    resolve_grid,
)
from layerfuse.features import LayerFeatures


def test_feature_list_accepts_lists_tuples_and_layer_features():
    x = [torch.zeros(2, 4, 3), torch.zeros(2, 5, 3)]
    assert len(check_feature_list("f", x)) == 2
    assert len(check_feature_list("f", tuple(x))) == 2
    assert len(check_feature_list("f", LayerFeatures(x, grid=(2, 2)))) == 2


@pytest.mark.parametrize(
    ("features", "error", "message"),
    [
        (torch.zeros(2, 4, 3), TypeError, r"f: features expected a sequence \(list or tuple\) of tensors, got Tensor"),
        ([], ValueError, "f: features expected at least 1 tensors, got 0"),
        ([torch.zeros(2, 4)], ValueError, r"f: features\[0\] expected a 3-d tensor \(B, N, C\), got shape \(2, 4\)"),
        ([torch.zeros(2, 4, 3, dtype=torch.long)], TypeError, r"features\[0\] expected a floating-point tensor"),
        ([torch.zeros(2, 4, 3), "x"], TypeError, r"features\[1\] expected a torch.Tensor, got str"),
        (
            [torch.zeros(2, 4, 3), torch.zeros(3, 4, 3)],
            ValueError,
            r"features\[1\] has batch size 3 but features\[0\] has 2; got shapes \(2, 4, 3\), \(3, 4, 3\)",
        ),
        (
            [torch.zeros(2, 4, 3), torch.zeros(2, 4, 3, dtype=torch.float64)],
            TypeError,
            r"features\[1\] has dtype torch.float64 but features\[0\] has torch.float32",
        ),
    ],
)
def test_feature_list_errors(features, error, message):
    with pytest.raises(error, match=message):
        check_feature_list("f", features)


def test_feature_list_length():
    with pytest.raises(ValueError, match="f: features expected 3 tensors, got 2"):
        check_feature_list("f", [torch.zeros(1, 2, 3)] * 2, length=3)


def test_widths():
    check_widths("f", [torch.zeros(1, 2, 3), torch.zeros(1, 2, 4)], [3, 4])
    with pytest.raises(ValueError, match=r"f: features\[1\] expected shape \(B, N, 5\), got \(1, 2, 4\)"):
        check_widths("f", [torch.zeros(1, 2, 3), torch.zeros(1, 2, 4)], [3, 5])


def test_grid_checks():
    assert check_grid("f", (3, 4)) == (3, 4)
    assert check_grid("f", [3, 4]) == (3, 4)
    with pytest.raises(TypeError, match=r"f: grid expected a pair of ints \(H, W\), got 12"):
        check_grid("f", 12)
    with pytest.raises(TypeError, match="pair of ints"):
        check_grid("f", (3.0, 4))
    with pytest.raises(ValueError, match=r"expected positive sides \(H, W\), got \(0, 4\)"):
        check_grid("f", (0, 4))


def test_resolve_grid_order_and_errors():
    feats = LayerFeatures([torch.zeros(1, 12, 2)], grid=(3, 4))
    assert resolve_grid("f", 12, (4, 3), feats) == (4, 3)  # explicit wins
    assert resolve_grid("f", 12, None, feats) == (3, 4)  # then the tap's grid
    assert resolve_grid("f", 12, None, [torch.zeros(1, 12, 2)], default=(2, 6)) == (2, 6)
    with pytest.raises(ValueError, match=r"cannot tell the patch grid of 16 tokens; pass grid=\(H, W\) \(e.g. grid=\(4, 4\)\)"):
        resolve_grid("f", 16, None, None)
    with pytest.raises(ValueError, match=r"grid is \(4, 4\) = 16 tokens but the input has 17 tokens; drop prefix"):
        resolve_grid("f", 17, (4, 4))
    with pytest.raises(ValueError, match=r"features.grid \(from the tap\) is \(3, 4\)"):
        resolve_grid("f", 13, None, feats)


def test_scalars():
    assert check_positive_int("f", "dim", 3) == 3
    with pytest.raises(TypeError, match="f: dim expected a positive int, got bool True"):
        check_positive_int("f", "dim", True)
    with pytest.raises(ValueError, match="f: dim expected a positive int, got 0"):
        check_positive_int("f", "dim", 0)
    check_choice("f", "mode", "a", ("a", "b"))
    with pytest.raises(ValueError, match="f: mode expected one of 'a', 'b', got 'c'"):
        check_choice("f", "mode", "c", ("a", "b"))


# ---------------------------------------------------------------- check_module_inputs and scalar checks



def test_module_inputs_accepts_matching_and_autocast():
    proj = Projector("linear", 4, 3)
    check_module_inputs("f", proj, x=torch.zeros(2, 4))
    with pytest.raises(TypeError, match=r"f: x has dtype torch.bfloat16 but the module's parameters are torch.float32"):
        check_module_inputs("f", proj, x=torch.zeros(2, 4, dtype=torch.bfloat16))
    # under autocast a float32 module takes bf16 inputs: autocast picks each op's dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        check_module_inputs("f", proj, x=torch.zeros(2, 4, dtype=torch.bfloat16))
        out = proj(torch.randn(2, 4, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_module_inputs_any_dtype_lists_and_parameter_free_modules():
    proj = Projector("linear", 4, 3)
    check_module_inputs("f", proj, text=torch.zeros(2, 4, dtype=torch.float64), any_dtype=("text",))
    # a bare tensor where a list belongs is left to the list's own check (which names the real mistake)
    check_module_inputs("f", proj, features=torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"features\[1\] has dtype torch.float64"):
        check_module_inputs("f", proj, features=[torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.float64)])
    free = torch.nn.Identity()
    check_module_inputs("f", free, x=torch.zeros(2, 4, dtype=torch.float64, device="meta"))
    with pytest.raises(TypeError, match=r"f: x expected a floating-point tensor, got dtype torch.int64"):
        check_module_inputs("f", free, x=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"f: x is on cpu but the module's parameters are on meta"):
        check_module_inputs("f", proj.to("meta"), x=torch.zeros(2, 4))


def test_checked_forward_compiles_fullgraph_and_exports_with_a_dynamic_batch():
    proj = Projector("mlp2x_gelu", 4, 3)
    x = torch.randn(3, 5, 4)
    compiled = torch.compile(proj, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), proj(x))
    batch = torch.export.Dim("batch")
    exported = torch.export.export(proj, (x,), dynamic_shapes=({0: batch},))
    torch.testing.assert_close(exported.module()(torch.randn(2, 5, 4)).shape, torch.Size([2, 5, 3]))


def test_scalar_checks():
    assert check_float("f", "eps", 1) == 1.0
    assert check_float("f", "p", 0.0, low=0.0, high=1.0, high_open=True) == 0.0
    with pytest.raises(ValueError, match=r"f: p expected a float in \[0, 1\), got 1.0"):
        check_float("f", "p", 1.0, low=0.0, high=1.0, high_open=True)
    with pytest.raises(ValueError, match=r"f: eps expected a float > 0, got -1.0"):
        check_float("f", "eps", -1.0, low=0.0, low_open=True)
    with pytest.raises(TypeError, match="f: eps expected a real number"):
        check_float("f", "eps", True)
    assert check_bool("f", "b", False) is False
    with pytest.raises(TypeError, match="f: b expected a bool"):
        check_bool("f", "b", 0)
    assert check_index_list("f", "layers", (3, -2)) == (3, -2)
    with pytest.raises(TypeError, match=r"f: layers\[0\] expected an int index, got float 1.5"):
        check_index_list("f", "layers", [1.5, 2, 3])
    with pytest.raises(ValueError, match="f: layers expected at least one index"):
        check_index_list("f", "layers", [])


def test_device_and_factory_checks():
    assert check_device("f", "--device", "cpu") == torch.device("cpu")
    assert check_device("f", "--device", torch.device("meta")).type == "meta"
    with pytest.raises(ValueError, match="f: --device expected a torch device"):
        check_device("f", "--device", "bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no cuda device is available"):
            check_device("f", "--device", "cuda")
    else:
        with pytest.raises(ValueError, match="cuda device"):
            check_device("f", "--device", f"cuda:{torch.cuda.device_count()}")
    assert factory_kwargs("f", None, torch.bfloat16) == {"device": None, "dtype": torch.bfloat16}
    with pytest.raises(TypeError, match=r"f: dtype expected a floating-point torch.dtype"):
        factory_kwargs("f", None, torch.int8)
