import pytest
import torch

from layerfuse._checks import (
    check_choice,
    check_feature_list,
    check_grid,
    check_positive_int,
    check_widths,
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
