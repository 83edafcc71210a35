import pytest
import torch

from layerfuse.convert import from_official, load_checkpoint_file, target_dtype


def test_unknown_method():
    with pytest.raises(ValueError, match=r"from_official: method expected one of 'dense_connector', .*got 'llava'"):
        from_official("llava", {})


def test_state_dict_type():
    with pytest.raises(TypeError, match="state_dict expected a mapping of tensors or a file path, got list"):
        from_official("dense_connector", [torch.zeros(1)])


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_official("dense_connector", tmp_path / "nope.bin")


def test_load_bin_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    sd = {"model.mm_projector.0.weight": torch.randn(3, 2, dtype=torch.bfloat16)}
    torch.save(sd, tmp_path / "mm_projector.bin")
    save_file(sd, str(tmp_path / "mm_projector.safetensors"))
    for name in ("mm_projector.bin", "mm_projector.safetensors"):
        loaded = load_checkpoint_file(tmp_path / name)
        assert loaded.keys() == sd.keys()
        assert torch.equal(loaded["model.mm_projector.0.weight"], sd["model.mm_projector.0.weight"])
    torch.save([1, 2], tmp_path / "list.bin")
    with pytest.raises(TypeError, match="holds a list, expected a dict of tensors"):
        load_checkpoint_file(tmp_path / "list.bin")


def test_target_dtype():
    half = {"a": torch.zeros(1, dtype=torch.bfloat16), "b": torch.zeros(1, dtype=torch.float16)}
    assert target_dtype(half, None, where="t") == torch.float32
    assert target_dtype({"a": torch.zeros(1, dtype=torch.float64)}, None, where="t") == torch.float64
    assert target_dtype(half, torch.float64, where="t") == torch.float64
    with pytest.raises(TypeError, match=r"t: dtype expected a floating-point torch\.dtype, got torch.int64"):
        target_dtype(half, torch.int64, where="t")
