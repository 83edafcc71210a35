import pytest
import torch
from torch import nn

from layerfuse import Projector, build_projector


def test_mlp2x_gelu_matches_llava():
    proj = Projector("mlp2x_gelu", 6, 4, dtype=torch.float64)
    assert list(proj.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert isinstance(proj[1], nn.GELU)
    assert proj[1].approximate == "none"
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    expected = proj[2](nn.functional.gelu(proj[0](x)))
    torch.testing.assert_close(proj(x), expected)


def test_kinds_and_parameter_counts():
    assert sum(p.numel() for p in Projector("mlp2x_gelu", 1024, 4096, device="meta").parameters()) == 20_979_712
    assert sum(p.numel() for p in Projector("mlp2x_gelu", 3072, 4096, device="meta").parameters()) == 29_368_320
    assert sum(p.numel() for p in Projector("linear", 3072, 4096, device="meta").parameters()) == 12_587_008
    mlp3 = Projector("mlp3x_gelu", 4, 5)
    assert [k for k in mlp3.state_dict() if k.endswith("weight")] == ["0.weight", "2.weight", "4.weight"]
    x = torch.randn(3, 4)
    assert torch.equal(Projector("identity", 4, 4)(x), x)
    assert build_projector("linear", 4, 5).kind == "linear"


def test_factory_kwargs_reset_and_repr():
    proj = Projector("mlp2x_gelu", 4, 5, device="meta", dtype=torch.float16)
    assert all(p.device.type == "meta" and p.dtype == torch.float16 for p in proj.parameters())
    real = Projector("linear", 4, 5)
    before = real[0].weight.clone()
    real.reset_parameters()
    assert not torch.equal(before, real[0].weight)
    assert real[0].weight.abs().max() <= 0.5  # nn.Linear's U(+-1/sqrt(fan_in))
    assert "kind='linear', in_dim=4, out_dim=5" in repr(real)
    assert real.get_config() == {"kind": "linear", "in_dim": 4, "out_dim": 5}


def test_round_trip(tmp_path):
    proj = Projector("mlp2x_gelu", 4, 5)
    proj.save_pretrained(tmp_path)
    again = Projector.from_pretrained(tmp_path)
    x = torch.randn(2, 4)
    assert torch.equal(again(x), proj(x))


def test_errors():
    with pytest.raises(ValueError, match=r"Projector: kind expected 'linear', 'identity' or 'mlp{N}x_gelu' with N >= 1, got 'mlp0x_gelu'"):
        Projector("mlp0x_gelu", 4, 4)
    with pytest.raises(ValueError, match="kind='identity' needs in_dim == out_dim, got 4 and 5"):
        Projector("identity", 4, 5)
    with pytest.raises(ValueError, match="Projector: in_dim expected a positive int, got 0"):
        Projector("linear", 0, 4)
    with pytest.raises(TypeError, match=r"Projector: out_dim expected a positive int, got float 4.0"):
        Projector("linear", 4, 4.0)
    with pytest.raises(ValueError, match=r"Projector.forward: x expected shape \(\*, 4\), got \(2, 5\)"):
        Projector("linear", 4, 4)(torch.randn(2, 5))
