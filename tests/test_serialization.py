import json

import pytest
import torch
from torch import nn

from layerfuse import ConcatFuser, FusionProjector, Projector, WeightedSumFuser
from layerfuse.serialization import CONFIG_NAME, WEIGHTS_NAME, PretrainedMixin, load_strict


def test_directory_layout(tmp_path):
    fuser = ConcatFuser([4, 4], norm=True)
    path = fuser.save_pretrained(tmp_path / "new" / "dir")
    saved = json.loads((path / CONFIG_NAME).read_text())
    assert saved["class"] == "ConcatFuser"
    assert saved["config"] == fuser.get_config()
    assert "layerfuse_version" in saved
    assert (path / WEIGHTS_NAME).is_file()


def test_generic_loader_rebuilds_the_saved_class(tmp_path):
    module = FusionProjector(WeightedSumFuser(4, 2), Projector("linear", 4, 3), layers=(1, 2))
    module.save_pretrained(tmp_path)
    again = PretrainedMixin.from_pretrained(tmp_path)
    assert isinstance(again, FusionProjector)
    assert isinstance(again.fuser, WeightedSumFuser)


def test_dtype_and_device_on_load(tmp_path):
    Projector("linear", 4, 3, dtype=torch.bfloat16).save_pretrained(tmp_path)
    assert Projector.from_pretrained(tmp_path).get_parameter("0.weight").dtype == torch.bfloat16
    assert Projector.from_pretrained(tmp_path, dtype=torch.float32).get_parameter("0.weight").dtype == torch.float32


def test_wrong_class_and_unknown_class(tmp_path):
    Projector("linear", 4, 3).save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="holds a Projector, not a ConcatFuser"):
        ConcatFuser.from_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["class"] = "NoSuchFuser"
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="names class 'NoSuchFuser', which layerfuse does not know"):
        Projector.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no config.json in"):
        Projector.from_pretrained(tmp_path / "missing")


def test_tampered_weights_are_refused_whole(tmp_path):
    from safetensors.torch import save_file

    ConcatFuser([4, 4], norm=True).save_pretrained(tmp_path)
    save_file({"norm.weight": torch.ones(8), "stray": torch.ones(1)}, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"(?s)nothing was loaded.*missing keys \(1\): norm.bias.*unexpected keys \(1\): stray"):
        ConcatFuser.from_pretrained(tmp_path)


def test_load_strict_is_all_or_nothing():
    module = nn.Linear(3, 2)
    before = module.weight.clone()
    with pytest.raises(ValueError, match=r"shape mismatches \(1\): bias: expected \(2,\), got \(3,\)"):
        load_strict(module, {"weight": torch.zeros(2, 3), "bias": torch.zeros(3)}, source="test")
    assert torch.equal(module.weight, before)
    load_strict(module, {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}, source="test")
    assert torch.count_nonzero(module.weight) == 0


def test_saving_leaves_only_the_two_files_and_overwrites_in_place(tmp_path):
    fuser = ConcatFuser([4, 4], norm=True)
    fuser.save_pretrained(tmp_path)
    with torch.no_grad():
        fuser.norm.weight.fill_(2.0)
    fuser.save_pretrained(tmp_path)  # written under a temporary name, then renamed over the old file
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert torch.equal(ConcatFuser.from_pretrained(tmp_path).norm.weight, torch.full((8,), 2.0))
