import torch

from layerfuse.layers import LayerScale


def test_zero_init_switches_branch_off_and_reset_restores():
    ls = LayerScale(4)
    x = torch.randn(2, 3, 4)
    assert torch.equal(ls(x), torch.zeros_like(x))
    with torch.no_grad():
        ls.gamma.fill_(2.0)
    assert torch.equal(ls(x), 2 * x)
    ls.reset_parameters()
    assert torch.count_nonzero(ls.gamma) == 0
    assert repr(ls) == "LayerScale(dim=4, init_value=0.0)"


def test_factory_kwargs():
    ls = LayerScale(3, 0.5, device="meta", dtype=torch.float64)
    assert ls.gamma.device.type == "meta"
    assert ls.gamma.dtype == torch.float64
