import pytest
import torch

from layerfuse.ops.layer_mean import accumulation_dtype, layer_mean


def test_equals_stacked_mean_and_leaves_inputs_alone():
    xs = [torch.randn(2, 5, 3, dtype=torch.float64) for _ in range(4)]
    copies = [x.clone() for x in xs]
    torch.testing.assert_close(layer_mean(xs), torch.stack(xs).mean(0), rtol=1e-15, atol=1e-15)
    assert all(torch.equal(x, c) for x, c in zip(xs, copies))
    single = layer_mean(xs[:1])
    assert torch.equal(single, xs[0])
    assert single.data_ptr() != xs[0].data_ptr()


def test_low_precision_accumulates_in_float32():
    # 0.001 is lost when added to 1 in bf16 (8 mantissa bits) but kept in a float32 accumulator
    xs = [torch.ones(4, dtype=torch.bfloat16)] + [torch.full((4,), 2.0**-9, dtype=torch.bfloat16)] * 7
    exact = (1 + 7 * 2.0**-9) / 8
    out = layer_mean(xs, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full((4,), exact), rtol=0, atol=1e-7)
    assert layer_mean(xs).dtype == torch.bfloat16
    assert accumulation_dtype(torch.float16) == torch.float32
    assert accumulation_dtype(torch.float64) == torch.float64


def test_gradient():
    xs = [torch.randn(3, 2, requires_grad=True) for _ in range(3)]
    layer_mean(xs).sum().backward()
    for x in xs:
        torch.testing.assert_close(x.grad, torch.full((3, 2), 1 / 3))


def test_empty():
    with pytest.raises(ValueError, match=r"layer_mean: tensors expected at least one tensor, got an empty sequence"):
        layer_mean([])
